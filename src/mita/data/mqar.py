"""``mqar``: multi-query associative recall (Arora et al., 2023, "Zoology"), generated from a seed.

A sequence of ``seq_len`` tokens starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct
keys drawn from ``1 .. vocab_size / 2 - 1``, values from ``vocab_size / 2 .. vocab_size - 1``, repeats
allowed). Every key is then queried once, in random order: a query is the key followed by its value
(teacher forcing), placed at a uniformly random pair slot of the rest of the sequence, which is filled
with token 0. The only loss positions are the queries: ``y[p]`` is the value of the key ``x[p]``; every
other target is ``-100`` (``ignore_index``). Zoology places queries at power-law gaps, mostly close to
the pairs; uniform slots make the average query look further back.

Example ``i`` of a split is drawn from its own RNG ``(seed, split, i)``, so any example can be made
on its own, in any order, in microseconds: nothing is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .tasks import TaskInfo

__all__ = ["MQARConfig", "MQAR", "IGNORE", "mqar_example", "SPLIT_SIZES"]

IGNORE = -100  # target of a position without loss (F.cross_entropy's default ignore_index)
FILLER = 0
SPLIT_SIZES = {"train": 100_000, "test": 1_000}
_SPLIT_IDS = {"train": 0, "test": 2}


@dataclass(frozen=True)
class MQARConfig:
    """Sizes of the task: vocabulary (keys in its lower half, values in its upper half), pairs, length."""

    vocab_size: int = 1024
    num_pairs: int = 64
    seq_len: int = 512

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_pairs", "seq_len"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"mqar: {name} must be a positive int, got {val!r}")
        if self.vocab_size // 2 - 1 < self.num_pairs:
            raise ValueError(
                f"mqar: vocab_size={self.vocab_size} gives {self.vocab_size // 2 - 1} distinct keys, "
                f"fewer than num_pairs={self.num_pairs}"
            )
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(
                f"mqar: seq_len={self.seq_len} cannot hold num_pairs={self.num_pairs} pairs and their "
                f"queries (needs seq_len >= 4 * num_pairs = {4 * self.num_pairs})"
            )


def mqar_example(rng: np.random.Generator, cfg: MQARConfig) -> tuple[np.ndarray, np.ndarray]:
    """One example ``(x, y)``, int64 arrays of length ``seq_len`` (see the module docstring)."""
    p, n, half = cfg.num_pairs, cfg.seq_len, cfg.vocab_size // 2
    keys = rng.choice(half - 1, size=p, replace=False) + 1
    values = rng.integers(half, cfg.vocab_size, size=p)
    x = np.full(n, FILLER, dtype=np.int64)
    y = np.full(n, IGNORE, dtype=np.int64)
    x[0 : 2 * p : 2], x[1 : 2 * p : 2] = keys, values
    slots = (n - 2 * p) // 2  # pair slots after the context
    where = 2 * p + 2 * np.sort(rng.choice(slots, size=p, replace=False))
    order = rng.permutation(p)  # which key is asked in each slot
    x[where], x[where + 1] = keys[order], values[order]
    y[where] = values[order]
    return x, y


class MQAR(Dataset):
    """``(x: long [seq_len], y: long [seq_len])`` examples of one split (``"train"`` or ``"test"``).

    Args:
        cfg: the task's sizes.
        split: ``"train"`` or ``"test"`` (disjoint RNG streams).
        seed: selects the data set; ``0`` is the canonical one.
        size: number of examples (default :data:`SPLIT_SIZES`).
        info: the :class:`TaskInfo` to expose as ``.info``.
    """

    def __init__(self, cfg: MQARConfig, split: str, seed: int = 0, size: int | None = None, info=None):
        if split not in _SPLIT_IDS:
            raise ValueError(f"mqar has splits {', '.join(_SPLIT_IDS)}; got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.cfg, self.split, self.seed = cfg, split, int(seed)
        self.size = SPLIT_SIZES[split] if size is None else int(size)
        if self.size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.info = info if info is not None else mqar_info(cfg)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(f"mqar/{self.split}: index {i} out of range 0..{self.size - 1}")
        rng = np.random.default_rng([self.seed, 29, _SPLIT_IDS[self.split], int(i)])
        x, y = mqar_example(rng, self.cfg)
        return torch.from_numpy(x), torch.from_numpy(y)


def mqar_info(cfg: MQARConfig) -> TaskInfo:
    """The :class:`TaskInfo` of an MQAR configuration (``num_classes`` = ``vocab_size``: next-token)."""
    return TaskInfo("mqar", "lm", cfg.vocab_size, cfg.vocab_size, cfg.seq_len, None, None)
