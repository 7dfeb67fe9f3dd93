"""ListOps: labels checked by an independent evaluator, grammar, lengths, determinism."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mita.data import build_dataset
from mita.data.listops import ListOpsConfig, decode, generate_example, generate_listops


def evaluate(expr: str) -> int:
    """Evaluate a ListOps string with an explicit stack (written independently of the generator)."""
    stack: list = []
    for tok in expr.split():
        if tok.startswith("["):
            stack.append([tok[1:]])
        elif tok == "]":
            op, *args = stack.pop()
            value = {
                "MAX": lambda a: max(a),
                "MIN": lambda a: min(a),
                "MED": lambda a: math.floor(statistics.median(a)),
                "SM": lambda a: sum(a) % 10,
            }[op](args)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            stack[-1].append(int(tok))
    raise ValueError(f"unbalanced expression: {expr[:80]}")


def test_evaluator_on_known_answers():
    assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]") == 9
    assert evaluate("[MED 1 2 3 4 ]") == 2  # median 2.5, rounded down
    assert evaluate("[SM 5 6 [MED 9 0 7 ] ]") == 8  # 5 + 6 + 7 = 18
    assert evaluate("[MIN [SM 9 9 ] [MAX 3 ] ]") == 3


def test_labels_match_independent_evaluator(tmp_path):
    ds = build_dataset("listops", "test", size=40, seq_len=400, cache_dir=tmp_path)
    for i in range(len(ds)):
        x, y = ds[i]
        assert y == evaluate(decode(x))


def test_shapes_vocab_and_lengths(tmp_path):
    ds = build_dataset("listops", "train", size=30, seq_len=300, cache_dir=tmp_path)
    assert ds.info.seq_len == 300 and ds.info.vocab_size == 16
    lengths = ds.lengths()
    assert lengths.min() >= 75 and lengths.max() <= 300  # [seq_len/4, seq_len]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (300,) and x.dtype == torch.long
        n = int(lengths[i])
        assert (x[n:] == 0).all() and (x[:n] > 0).all() and x.max() < 16
        assert 0 <= y < 10
        toks = decode(x).split()
        assert toks[0] in ("[MAX", "[MIN", "[MED", "[SM") and toks[-1] == "]"
        depth = max_depth = 0
        for t in toks:
            depth += t.startswith("[")
            max_depth = max(max_depth, depth)
            depth -= t == "]"
        assert depth == 0 and max_depth <= 10


def test_canonical_defaults_are_the_lra_ones():
    cfg = ListOpsConfig()
    assert (cfg.min_length, cfg.max_length, cfg.max_depth, cfg.max_args, cfg.op_prob) == (
        500,
        2000,
        10,
        10,
        0.25,
    )
    tokens, label = generate_example(0, "train", 0)
    assert 500 <= len(tokens) <= 2000 and label == evaluate(decode(tokens))


def test_deterministic_prefix_and_split_streams():
    cfg = ListOpsConfig(max_length=200, min_length=50)
    a = generate_listops(12, 3, "train", cfg)
    b = generate_listops(6, 3, "train", cfg)
    n = b["offsets"][-1]
    assert (a["tokens"][:n] == b["tokens"]).all() and (a["labels"][:6] == b["labels"]).all()
    other_seed = generate_listops(6, 4, "train", cfg)
    other_split = generate_listops(6, 3, "val", cfg)
    for c in (other_seed, other_split):
        assert c["tokens"].shape != b["tokens"].shape or not (c["tokens"] == b["tokens"]).all()


def test_parallel_generation_equals_serial():
    cfg = ListOpsConfig(max_length=120, min_length=30)
    serial = generate_listops(16, 0, "val", cfg, workers=1)
    parallel = generate_listops(16, 0, "val", cfg, workers=2)
    for k in serial:
        assert (serial[k] == parallel[k]).all()


def test_bad_config_and_split():
    with pytest.raises(ValueError, match="min_length <= max_length"):
        ListOpsConfig(min_length=100, max_length=50)
    with pytest.raises(ValueError, match="splits"):
        generate_listops(2, 0, "dev")
    with pytest.raises(ValueError, match="no ListOps tree of 30..30 tokens"):
        generate_example(0, "train", 0, ListOpsConfig(min_length=30, max_length=30, max_depth=1))
