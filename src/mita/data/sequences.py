"""Datasets whose documents are spans ``tokens[starts[i]:ends[i]]`` of one array, padded on access."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .tasks import PAD_ID, TaskInfo

__all__ = ["SpanSequences", "SpanPairs"]


class _Spans:
    def __init__(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, info: TaskInfo, shift: int):
        starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        if starts.shape != ends.shape or starts.ndim != 1:
            raise ValueError(
                f"{info.name}: starts {starts.shape} and ends {ends.shape} must be equal 1-D shapes"
            )
        lengths = ends - starts
        if len(starts) and (starts.min() < 0 or ends.max() > len(tokens) or lengths.min() < 0):
            raise ValueError(
                f"{info.name}: document spans do not index the token array ({len(tokens)} tokens)"
            )
        if len(starts) and lengths.max() > info.seq_len:
            raise ValueError(
                f"{info.name}: a document has {lengths.max()} tokens, more than seq_len={info.seq_len}"
            )
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        self.starts, self.ends = starts, ends
        self.info = info
        self.shift = shift  # stored value -> token id (1 for bytes/pixels, so that 0 stays padding)

    def doc(self, j: int) -> torch.Tensor:
        """Document ``j`` as token ids, padded with ``PAD_ID`` to ``info.seq_len``."""
        a, b = int(self.starts[j]), int(self.ends[j])
        out = torch.full((self.info.seq_len,), PAD_ID, dtype=torch.long)
        out[: b - a] = self.tokens[a:b].long() + self.shift
        return out

    def lengths(self) -> np.ndarray:
        """Unpadded length of every document."""
        return self.ends - self.starts


class SpanSequences(_Spans, Dataset):
    """``(long [seq_len], label)`` with document ``i`` as the sequence."""

    def __init__(self, tokens, starts, ends, labels, info: TaskInfo, shift: int = 0):
        super().__init__(tokens, starts, ends, info, shift)
        if len(labels) != len(self.starts):
            raise ValueError(f"{info.name}: {len(labels)} labels for {len(self.starts)} documents")
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.doc(i), int(self.labels[i])


class SpanPairs(_Spans, Dataset):
    """``((long [seq_len], long [seq_len]), label)``: pair ``i`` is documents ``left[i]`` and ``right[i]``."""

    def __init__(self, tokens, starts, ends, left, right, labels, info: TaskInfo, shift: int = 0):
        super().__init__(tokens, starts, ends, info, shift)
        left, right = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
        if not (len(left) == len(right) == len(labels)):
            raise ValueError(f"{info.name}: {len(left)} left, {len(right)} right, {len(labels)} labels")
        n_docs = len(self.starts)
        if len(left) and (min(left.min(), right.min()) < 0 or max(left.max(), right.max()) >= n_docs):
            raise ValueError(f"{info.name}: pair indices outside 0..{n_docs - 1}")
        self.left, self.right = left, right
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        return (self.doc(self.left[i]), self.doc(self.right[i])), int(self.labels[i])
