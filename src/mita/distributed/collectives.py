"""Differentiable collectives for context parallelism, with a debug counter of the bytes they send.

Each collective is an autograd Function over a plain ``torch.distributed`` call, so its backward is the
adjoint collective (all-gather <-> reduce-scatter, all-reduce <-> all-reduce) and both directions are
counted. Gradients follow the usual convention of distributed autograd: the objective is the *sum* of the
ranks' losses, so the gradient of a rank's input collects the contributions of every rank.

Bytes are counted as what one rank sends under the standard algorithms (ring or direct), which is also
what a one-to-all exchange must send at least:

- all-gather of a local chunk of ``c`` bytes: ``(P - 1) c``;
- reduce-scatter producing a chunk of ``c`` bytes: ``(P - 1) c``;
- all-reduce of ``S`` bytes: ``2 (P - 1) S / P`` (reduce-scatter then all-gather).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd import Function

__all__ = ["CommStats", "comm_stats", "all_gather", "all_reduce_sum", "group_size", "group_rank"]


@dataclass
class CommStats:
    """Bytes sent by this rank and number of calls, per ``(label, direction)``; direction is
    ``"forward"`` or ``"backward"``. Filled while :func:`comm_stats` is active."""

    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, label: str, direction: str, nbytes: int) -> None:
        key = (label, direction)
        self.bytes[key] = self.bytes.get(key, 0) + int(nbytes)
        self.calls[key] = self.calls.get(key, 0) + 1

    def total(self, direction: str | None = None) -> int:
        """Bytes sent in ``direction`` (both when None)."""
        return sum(b for (_, d), b in self.bytes.items() if direction is None or d == direction)

    def by_label(self, direction: str) -> dict[str, int]:
        """``{label: bytes}`` for one direction."""
        return {lab: b for (lab, d), b in self.bytes.items() if d == direction}


_ACTIVE: list[CommStats] = []


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count the bytes the context-parallel collectives send while the block runs (forward and any
    backward run inside it). Nested blocks each see their own calls."""
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def _record(label: str, direction: str, nbytes: float) -> None:
    for stats in _ACTIVE:
        stats.add(label, direction, round(nbytes))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


class _AllGather(Function):
    """``x`` -> ``[P, *x.shape]`` (every rank's ``x`` in rank order); backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, label: str) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.label, ctx.shape = group, label, x.shape
        p = group_size(group)
        x = x.contiguous()
        x = x.reshape(1, -1)
        out = x.new_empty((p, x.shape[1]))
        dist.all_gather_single(out, x, group=group)
        _record(label, "forward", (p - 1) * _nbytes(x))
        return out.reshape(p, *ctx.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        p = group_size(ctx.group)
        grad = grad.contiguous().reshape(p, -1)
        out = grad.new_empty((1, grad.shape[1]))
        dist.reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        _record(ctx.label, "backward", (p - 1) * _nbytes(out))
        return out.reshape(ctx.shape), None, None


class _AllReduceSum(Function):
    """Sum over ranks; backward: the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, label: str) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.label = group, label
        p = group_size(group)
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        _record(label, "forward", 2 * (p - 1) * _nbytes(out) / p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        p = group_size(ctx.group)
        out = grad.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        _record(ctx.label, "backward", 2 * (p - 1) * _nbytes(out) / p)
        return out, None, None


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, label: str) -> torch.Tensor:
    """Differentiable all-gather along a new leading dim: ``[P, *x.shape]``, in rank order."""
    if group_size(group) == 1:
        return x.unsqueeze(0)
    return _AllGather.apply(x, group, label)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None, label: str) -> torch.Tensor:
    """Differentiable sum over the ranks of ``group``."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group, label)
