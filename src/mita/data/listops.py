"""ListOps (Nangia & Bowman 2018, as used by the Long Range Arena): nested list operations over digits.

Grammar: ``expr := digit | [OP expr expr ... ]`` with OP in MAX, MIN, MED (median, rounded down as
``int(np.median)`` does), SM (sum modulo 10); the label is the value of the whole expression (10 classes).
Trees are drawn as in the LRA generator: below ``max_depth`` a node is an operator with probability
``op_prob`` (0.25) and has 2..``max_args`` (10) arguments; the root is always an operator; examples whose
token count falls outside ``[min_length, max_length]`` are redrawn. Sequences are written without the
LRA's redundant parentheses, so every token carries information and 2,000 tokens suffice.

Each example is drawn from its own RNG seeded by ``(seed, split, index)``: a smaller ``size`` gives a
prefix of the full data set, and any example can be regenerated alone.
"""

from __future__ import annotations

import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "ListOpsConfig",
    "TOKENS",
    "VOCAB",
    "generate_example",
    "generate_listops",
    "decode",
    "SPLIT_SIZES",
]

OPS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
# id 0 is padding; digits first so that token id = digit + 1
TOKENS: tuple[str, ...] = ("<pad>",) + tuple(str(d) for d in range(10)) + OPS + (END,)
VOCAB: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}
_OP_IDS = [VOCAB[o] for o in OPS]
_END_ID = VOCAB[END]
SPLIT_SIZES = {"train": 96_000, "val": 2_000, "test": 2_000}  # the LRA's sizes
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_MAX_TRIES = 100_000  # trees drawn for one example before the length bounds are declared unreachable


@dataclass(frozen=True)
class ListOpsConfig:
    """Generation parameters (defaults: the LRA's)."""

    max_length: int = 2000
    min_length: int = 500
    max_depth: int = 10
    max_args: int = 10
    op_prob: float = 0.25

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                f"ListOps needs 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}"
            )
        if self.max_args < 2 or self.max_depth < 1 or not 0.0 < self.op_prob <= 1.0:
            raise ValueError(f"bad ListOps config {self}")


def _value(op: int, args: list[int]) -> int:
    if op == _OP_IDS[0]:
        return max(args)
    if op == _OP_IDS[1]:
        return min(args)
    if op == _OP_IDS[2]:
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    return sum(args) % 10


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, cfg: ListOpsConfig, out: list[int], root: bool) -> int:
    """Append one subtree's tokens to ``out`` and return its value; abort early once too long."""
    if not root and (depth >= cfg.max_depth or rng.random() >= cfg.op_prob):
        d = rng.randrange(10)
        out.append(d + 1)
        return d
    op = _OP_IDS[rng.randrange(4)]
    out.append(op)
    args = [_tree(rng, depth + 1, cfg, out, False) for _ in range(rng.randint(2, cfg.max_args))]
    out.append(_END_ID)
    if len(out) > cfg.max_length:  # no point finishing a tree that will be rejected
        raise _TooLong
    return _value(op, args)


def generate_example(
    seed: int, split: str, index: int, cfg: ListOpsConfig = ListOpsConfig()
) -> tuple[list[int], int]:
    """Token ids and label of example ``index`` of ``split``; a pure function of its arguments."""
    rng = random.Random(f"listops/{seed}/{_SPLIT_IDS[split]}/{index}")
    for _ in range(_MAX_TRIES):
        out: list[int] = []
        try:
            label = _tree(rng, 1, cfg, out, True)
        except _TooLong:
            continue
        if cfg.min_length <= len(out) <= cfg.max_length:
            return out, label
    raise ValueError(
        f"no ListOps tree of {cfg.min_length}..{cfg.max_length} tokens in {_MAX_TRIES} draws ({cfg})"
    )


def generate_listops(
    n: int, seed: int, split: str, cfg: ListOpsConfig = ListOpsConfig(), workers: int = 1
) -> dict[str, np.ndarray]:
    """``n`` examples, ragged: ``tokens`` uint8 (concatenated), ``offsets`` int64 [n+1], ``labels``."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"ListOps has splits {list(_SPLIT_IDS)}, got {split!r}")

    # daemonic processes (e.g. pool workers) may not start children: generate serially there
    if workers > 1 and n >= 4 * workers and not multiprocessing.current_process().daemon:
        bounds = np.linspace(0, n, workers + 1).astype(int)
        with ProcessPoolExecutor(workers) as pool:
            parts = list(
                pool.map(_range, [(seed, split, a, b, asdict(cfg)) for a, b in zip(bounds, bounds[1:])])
            )
    else:
        parts = [_range((seed, split, 0, n, asdict(cfg)))]
    seqs = [s for p in parts for s in p[0]]
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.uint8, count=int(offsets[-1]))
    return {"tokens": tokens, "offsets": offsets, "labels": labels}


def _range(job: tuple) -> tuple[list[list[int]], np.ndarray]:
    seed, split, a, b, cfg = job
    cfg = ListOpsConfig(**cfg)
    seqs, labels = [], []
    for i in range(a, b):
        s, y = generate_example(seed, split, i, cfg)
        seqs.append(s)
        labels.append(y)
    return seqs, np.asarray(labels, dtype=np.int64)


def decode(ids) -> str:
    """Token ids back to the space-separated ListOps string (padding dropped)."""
    return " ".join(TOKENS[int(i)] for i in ids if int(i) != 0)
