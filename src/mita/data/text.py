"""Byte-level ``text`` (genre of a passage) and ``retrieval`` (two passages, same play?) tasks.

A document is a run of whole lines of one play, at most ``seq_len`` bytes long; its target length is
drawn uniformly from ``[seq_len / 4, seq_len]`` so that lengths vary as in the LRA's IMDB/AAN tasks.
- train documents are random windows (any line start) of the 25 training plays; an example stream
  drawn in order from one RNG, so a smaller ``size`` gives a prefix of the full set;
- test documents cut the 13 test plays into consecutive, non-overlapping pieces.
``text``: label = First-Folio genre (0 comedy, 1 history, 2 tragedy); train examples cycle through
the genres (exactly balanced), the test set is subsampled to equal counts per genre.
``retrieval``: label 1 when both documents come from the same play (never overlapping), 0 when from
different plays (half of these from two plays of the same genre, so genre alone cannot decide);
exactly balanced.
"""

from __future__ import annotations

import numpy as np

from .corpus import CLASSES, Play

__all__ = ["SPLIT_SIZES", "doc_end", "pack_play", "build_text", "build_retrieval"]

SPLIT_SIZES = {
    "text": {"train": 24_000, "test": None},  # None: every test document (after balancing)
    "retrieval": {"train": 40_000, "test": 4_000},
}
_SPLIT_IDS = {"train": 0, "test": 2}
_MAX_DRAWS = 10_000


def doc_end(play: Play, start: int, target: int, lo: int, hi: int) -> int:
    """End (exclusive byte offset) of the document starting at ``start``.

    The last line boundary at most ``target`` bytes on; if that leaves fewer than ``lo`` bytes, the
    first boundary at least ``lo`` bytes on (if within ``hi``); failing both, a cut at ``target``.
    """
    n = len(play.text)
    if start + target >= n:
        return n
    starts = play.line_starts
    end = int(starts[int(np.searchsorted(starts, start + target, side="right")) - 1])
    if end - start >= lo:
        return end
    k = int(np.searchsorted(starts, start + lo, side="left"))
    longer = int(starts[k]) if k < len(starts) else n
    return longer if longer - start <= hi else start + target


def pack_play(play: Play, rng: np.random.Generator, seq_len: int) -> list[tuple[int, int]]:
    """Consecutive non-overlapping documents covering the play; drops a last piece < ``seq_len/4``."""
    lo = seq_len // 4
    docs, pos, n = [], 0, len(play.text)
    while n - pos >= lo:
        end = doc_end(play, pos, int(rng.integers(lo, seq_len + 1)), lo, seq_len)
        docs.append((pos, end))
        pos = end
    return docs


def _random_doc(play: Play, rng: np.random.Generator, seq_len: int) -> tuple[int, int]:
    lo = seq_len // 4
    last = int(np.searchsorted(play.line_starts, len(play.text) - lo, side="right"))  # starts leaving >= lo
    start = int(play.line_starts[rng.integers(0, max(last, 1))])
    return start, doc_end(play, start, int(rng.integers(lo, seq_len + 1)), lo, seq_len)


def _corpus(pool: list[Play]) -> tuple[np.ndarray, dict[str, int]]:
    """All plays of ``pool`` in one byte array, and each play's offset in it (documents index into it)."""
    base = np.cumsum([0] + [len(p.text) for p in pool[:-1]])
    return np.frombuffer(b"".join(p.text for p in pool), dtype=np.uint8).copy(), {
        p.name: int(b) for p, b in zip(pool, base)
    }


class _Sampler:
    """Draws a play index with probability proportional to its length (cheap repeated draws)."""

    def __init__(self, plays: list[Play]):
        self.cum = np.cumsum([len(p.text) for p in plays], dtype=np.float64)
        self.cum /= self.cum[-1]

    def __call__(self, rng: np.random.Generator) -> int:
        return int(np.searchsorted(self.cum, rng.random(), side="right"))


def _split_plays(plays: list[Play], split: str) -> list[Play]:
    chosen = [p for p in plays if p.test == (split == "test")]
    missing = {CLASSES[c] for c in range(len(CLASSES))} - {CLASSES[p.label] for p in chosen}
    if missing:
        raise ValueError(f"corpus has no {split} play of genre(s) {sorted(missing)}")
    return chosen


def build_text(
    plays: list[Play], split: str, seed: int, seq_len: int, n: int | None
) -> dict[str, np.ndarray]:
    """Arrays ``tokens`` (the split's plays as bytes), ``starts``, ``ends`` (documents), ``labels``."""
    rng = np.random.default_rng([seed, 11, _SPLIT_IDS[split]])
    pool = _split_plays(plays, split)
    tokens, base = _corpus(pool)
    spans, labels = [], []
    if split == "train":
        n = SPLIT_SIZES["text"]["train"] if n is None else n
        by_class = [[p for p in pool if p.label == c] for c in range(len(CLASSES))]
        samplers = [_Sampler(g) for g in by_class]
        while len(labels) < n:
            for c in rng.permutation(len(CLASSES)):  # one of each genre per round: exact balance
                if len(labels) == n:
                    break
                play = by_class[c][samplers[c](rng)]
                a, b = _random_doc(play, rng, seq_len)
                spans.append((base[play.name] + a, base[play.name] + b))
                labels.append(c)
    else:
        docs = [(p, d) for p in pool for d in pack_play(p, rng, seq_len)]
        per_class = [[i for i, (p, _) in enumerate(docs) if p.label == c] for c in range(len(CLASSES))]
        keep = min(len(g) for g in per_class)
        chosen = np.concatenate([rng.choice(g, keep, replace=False) for g in per_class])
        chosen = rng.permutation(chosen)[: len(chosen) if n is None else n]
        for i in chosen:
            play, (a, b) = docs[i]
            spans.append((base[play.name] + a, base[play.name] + b))
            labels.append(play.label)
    return _arrays(tokens, spans, labels=labels)


def _arrays(tokens: np.ndarray, spans: list[tuple[int, int]], **ints: list[int]) -> dict[str, np.ndarray]:
    se = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    out = {"tokens": tokens, "starts": se[:, 0].copy(), "ends": se[:, 1].copy()}
    out.update({k: np.asarray(v, dtype=np.int64) for k, v in ints.items()})
    return out


def _partners(pool: list[Play]) -> list[list[list[int]]]:
    """``[i][same_genre]``: the plays a negative pair with play ``i`` may take its second passage from."""
    out = []
    for i, p in enumerate(pool):
        others = [j for j in range(len(pool)) if j != i]
        split = [[j for j in others if (pool[j].label == p.label) == bool(s)] for s in (0, 1)]
        out.append([g or others for g in split])  # a genre with a single play: any other play
    return out


def build_retrieval(
    plays: list[Play], split: str, seed: int, seq_len: int, n: int | None
) -> dict[str, np.ndarray]:
    """Arrays ``tokens``, ``starts``, ``ends`` (documents) and ``left``, ``right``, ``labels`` (pairs)."""
    rng = np.random.default_rng([seed, 13, _SPLIT_IDS[split]])
    pool = _split_plays(plays, split)
    tokens, base = _corpus(pool)
    n = SPLIT_SIZES["retrieval"][split] if n is None else n
    sample, partners = _Sampler(pool), _partners(pool)
    spans: list[tuple[int, int]] = []
    left, right, labels = [], [], []
    if split == "test":
        for p in pool:
            spans += [(base[p.name] + a, base[p.name] + b) for a, b in pack_play(p, rng, seq_len)]
        owner = np.searchsorted([base[p.name] for p in pool], [s for s, _ in spans], side="right") - 1
        doc_ids = [np.flatnonzero(owner == i) for i in range(len(pool))]
        seen: set[tuple[int, int]] = set()
    for k in range(n):
        label = k % 2  # alternate: exactly balanced, and any prefix is too
        for _ in range(_MAX_DRAWS):  # redraw plays and passages until the pair is admissible
            i = sample(rng)
            if label:
                j = i
            else:
                group = partners[i][int(rng.integers(0, 2))]  # other genre or same genre, half each
                j = group[int(rng.integers(0, len(group)))]
            if split == "train":
                a = _random_doc(pool[i], rng, seq_len)
                b = _random_doc(pool[j], rng, seq_len)
                if not (label and b[0] < a[1] and a[0] < b[1]):  # same play: passages must not overlap
                    break
            else:
                x = int(doc_ids[i][rng.integers(0, len(doc_ids[i]))])
                y = int(doc_ids[j][rng.integers(0, len(doc_ids[j]))])
                if x != y and (min(x, y), max(x, y)) not in seen:  # distinct documents, no pair twice
                    break
        else:
            raise ValueError(
                f"retrieval/{split}: could not draw pair {k} of {n} in {_MAX_DRAWS} tries; "
                f"the {len(pool)} plays are too short for seq_len={seq_len} or for {n} distinct pairs"
            )
        if split == "train":
            left.append(len(spans))
            right.append(len(spans) + 1)
            spans += [(base[pool[i].name] + a[0], base[pool[i].name] + a[1])]
            spans += [(base[pool[j].name] + b[0], base[pool[j].name] + b[1])]
        else:
            seen.add((min(x, y), max(x, y)))
            left.append(x)
            right.append(y)
        labels.append(label)
    return _arrays(tokens, spans, left=left, right=right, labels=labels)
