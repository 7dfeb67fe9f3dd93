"""shakespeare-char (mita.data.shakespeare): split by play, byte windows, next-byte targets, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mita.data import build_dataset, get_task
from mita.data.corpus import TEST_PLAYS, Play
from mita.data.shakespeare import ShakespeareChar, play_stream


def _play(name: str, text: bytes) -> Play:
    return Play(name, 0, text, np.array([0], dtype=np.int64))


def test_split_by_play_without_overlap():
    test_name = sorted(TEST_PLAYS)[0]
    plays = [
        _play("a-train", b"AAAA\n" * 50),
        _play(test_name, b"TTTT\n" * 40),
        _play("b-train", b"BB\n" * 30),
    ]
    train, test = play_stream(plays, "train"), play_stream(plays, "test")
    assert bytes(train) == b"AAAA\n" * 50 + b"BB\n" * 30  # training plays in name order, test play left out
    assert bytes(test) == b"TTTT\n" * 40
    for x, y in ShakespeareChar(test, "test", 16):
        assert set(bytes(x.tolist()) + bytes(y.tolist())) <= set(b"T\n")
    for x, _ in ShakespeareChar(train, "train", 16, seed=1):
        assert b"T" not in bytes(x.tolist())


def test_windows_are_next_byte_pairs():
    stream = np.arange(200, dtype=np.uint8)
    test = ShakespeareChar(stream, "test", 32)
    assert len(test) == 6  # (200 - 1) // 32 non-overlapping windows
    for i in range(len(test)):
        x, y = test[i]
        assert x.dtype == torch.long and torch.equal(x, torch.arange(32 * i, 32 * i + 32))
        assert torch.equal(y, x + 1)
    spread = ShakespeareChar(stream, "test", 32, size=3)
    assert [spread.start(i) for i in range(3)] == [0, 32 * 2, 32 * 5]  # linspace(0, 5, 3), rounded
    train = ShakespeareChar(stream, "train", 32, seed=5)
    again = ShakespeareChar(stream, "train", 32, seed=5)
    assert len(train) == 6
    for i in range(len(train)):
        x, y = train[i]
        assert torch.equal(y[:-1], x[1:]) and torch.equal(x, again[i][0])
    other = ShakespeareChar(stream, "train", 32, seed=6)
    assert [train.start(i) for i in range(6)] != [other.start(i) for i in range(6)]


@pytest.mark.slow  # reads and cleans all 38 plays
def test_the_real_corpus_through_build_dataset():
    info = get_task("shakespeare-char")
    assert info.kind == "lm" and info.vocab_size == 256 and info.bytes_per_token == 1.0
    test = build_dataset("shakespeare-char", "test", seq_len=256, size=8)
    train = build_dataset("shakespeare-char", "train", seq_len=256, size=8)
    assert len(test) == 8 and len(train) == 8 and test.info.seq_len == 256
    x, y = test[0]
    assert x.shape == y.shape == (256,) and torch.equal(x[1:], y[:-1])
    tr, te = bytes(train.tokens.numpy()), bytes(test.tokens.numpy())
    probe = te[100_000:100_200]  # a test passage never occurs in the training plays
    assert probe in te and probe not in tr


def test_bad_arguments_raise():
    stream = np.zeros(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="splits train, test; got 'val'"):
        play_stream([], "val")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ShakespeareChar(stream, "test", 16)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        ShakespeareChar(stream, "test", 0)
    with pytest.raises(ValueError, match="seq_len must be an int >= 16"):
        build_dataset("shakespeare-char", "train", seq_len=8)
    with pytest.raises(IndexError):
        ShakespeareChar(stream, "test", 4)[2]
