"""Lexical baselines for the text tasks, on inputs with known answers."""

from __future__ import annotations

import dataclasses

import numpy as np

from mita.data import get_task
from mita.data.baselines import documents, naive_bayes_accuracy, name_overlap_accuracy
from mita.data.sequences import SpanPairs


def test_naive_bayes_known_answers():
    train = ["apple pear apple", "pear apple fig", "apple fig pear"] + [
        "stone rock",
        "rock stone iron",
        "iron rock",
    ]
    labels = [0, 0, 0, 1, 1, 1]
    assert naive_bayes_accuracy(train, labels, ["Apple fig", "ROCK iron"], [0, 1], min_df=1) == 1.0
    assert naive_bayes_accuracy(train, labels, ["apple", "stone"], [1, 1], min_df=1) == 0.5
    # min_df drops words seen in fewer documents: "fig" (2 docs) is ignored at min_df=3 -> tie -> class 0
    assert naive_bayes_accuracy(train, labels, ["fig"], [0], min_df=3) == 1.0


def _pairs(texts: list[str], pairs: list[tuple[int, int, int]]) -> SpanPairs:
    ends = np.cumsum([len(t.encode()) for t in texts])
    starts = ends - [len(t.encode()) for t in texts]
    raw = np.frombuffer("".join(texts).encode(), np.uint8).copy()
    left, right, labels = (np.array(v) for v in zip(*pairs))
    return SpanPairs(
        raw, starts, ends, left, right, labels, dataclasses.replace(get_task("retrieval"), seq_len=64)
    )


def test_name_overlap_known_answer():
    texts = ["HAMLET speaks", "HAMLET again", "KING LEAR rages", "LEAR weeps", "PUCK flies"]
    train = _pairs(texts, [(0, 1, 1), (2, 3, 1), (0, 2, 0), (1, 4, 0)])
    assert documents(train) == texts
    # overlaps: 1, 1/2, 0, 0 -> the fitted threshold (0.5) separates them
    test = _pairs(texts, [(3, 2, 1), (4, 0, 0), (1, 0, 1), (3, 4, 0)])
    assert name_overlap_accuracy(train, test) == 1.0
    flipped = _pairs(texts, [(3, 2, 0), (4, 0, 1)])
    assert name_overlap_accuracy(train, flipped) == 0.0
