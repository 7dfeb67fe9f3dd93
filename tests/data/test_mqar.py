"""MQAR generator (mita.data.mqar): layout, answers, loss positions, determinism, bad input."""

from __future__ import annotations

import pytest
import torch

from mita.data import build_dataset
from mita.data.mqar import IGNORE, MQAR, MQARConfig


@pytest.mark.parametrize("pairs, n, vocab", [(4, 16, 16), (32, 512, 1024), (64, 256, 256)])
def test_examples_have_the_zoology_layout(pairs, n, vocab):
    ds = MQAR(MQARConfig(vocab, pairs, n), "train", seed=3, size=20)
    half = vocab // 2
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == y.shape == (n,) and x.dtype == y.dtype == torch.long
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys.tolist())) == pairs  # distinct keys
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab)).all()
        answer = dict(zip(keys.tolist(), values.tolist()))
        where = (y != IGNORE).nonzero().flatten()
        assert len(where) == pairs and (where >= 2 * pairs).all()  # every key queried once, after the pairs
        assert sorted(x[where].tolist()) == sorted(keys.tolist())
        for p in where.tolist():
            assert y[p] == answer[int(x[p])]  # the target is the key's value
            assert x[p + 1] == y[p]  # teacher forcing: the value follows the query
            first = int((x[:p] == x[p]).nonzero()[0])
            assert first < 2 * pairs and first % 2 == 0  # the key appears earlier, in the context
        rest = torch.ones(n, dtype=torch.bool)
        rest[: 2 * pairs] = False
        rest[where], rest[where + 1] = False, False
        assert (x[rest] == 0).all()  # filler elsewhere


def test_deterministic_by_seed_split_and_index():
    cfg = MQARConfig(64, 8, 64)
    a, b = MQAR(cfg, "train", seed=1, size=5), MQAR(cfg, "train", seed=1, size=5)
    for i in range(5):
        assert all(torch.equal(s, t) for s, t in zip(a[i], b[i]))
    other_seed, test = MQAR(cfg, "train", seed=2, size=5), MQAR(cfg, "test", seed=1, size=5)
    assert not torch.equal(a[0][0], other_seed[0][0]) and not torch.equal(a[0][0], test[0][0])
    assert not torch.equal(a[0][0], a[1][0])


def test_build_dataset_carries_the_sizes():
    ds = build_dataset("mqar", "test", seq_len=128, num_pairs=16, vocab_size=256, size=7)
    assert len(ds) == 7 and ds.info.kind == "lm" and ds.info.vocab_size == 256 and ds.info.seq_len == 128
    assert ds.info.bytes_per_token is None
    x, y = ds[6]
    assert x.shape == (128,) and int((y != IGNORE).sum()) == 16


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"vocab_size": 16, "num_pairs": 8, "seq_len": 64}, "gives 7 distinct keys, fewer than num_pairs=8"),
        ({"vocab_size": 64, "num_pairs": 8, "seq_len": 31}, "seq_len >= 4 \\* num_pairs = 32"),
        ({"vocab_size": 64, "num_pairs": 0, "seq_len": 64}, "num_pairs must be a positive int"),
        ({"vocab_size": 64.0, "num_pairs": 4, "seq_len": 64}, "vocab_size must be a positive int"),
    ],
)
def test_bad_sizes_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        MQARConfig(**kw)


def test_bad_arguments_raise():
    cfg = MQARConfig(64, 8, 64)
    with pytest.raises(ValueError, match="splits train, test; got 'val'"):
        MQAR(cfg, "val")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        MQAR(cfg, "train", seed=-1)
    with pytest.raises(ValueError, match="only apply to 'mqar'"):
        build_dataset("listops", "train", num_pairs=4)
    with pytest.raises(IndexError):
        MQAR(cfg, "train", size=3)[3]
