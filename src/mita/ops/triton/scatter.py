"""Deterministic scatter-add: ``out[target[i]] += src[i]`` with a fixed summation order per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pow2


@triton.jit
def _segment_sum_kernel(SRC, ORDER, OFFSETS, OUT, width, BLOCK_W: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_W)
    w_ok = offs < width
    start = tl.load(OFFSETS + r)
    end = tl.load(OFFSETS + r + 1)
    acc = tl.zeros([BLOCK_W], tl.float32)
    for i in range(start, end):
        src_row = tl.load(ORDER + i)
        acc += tl.load(SRC + src_row * width + offs, mask=w_ok, other=0.0)
    tl.store(OUT + r * width + offs, acc, mask=w_ok)


def segment_sum(src: torch.Tensor, target: torch.Tensor, rows: int) -> torch.Tensor:
    """Sum the rows of ``src`` [L, W] (float32) into ``rows`` output rows by ``target`` [L] (int64).

    Contributions are sorted by target with a stable sort, so every output row adds its
    contributions in source order: the result is bitwise reproducible, unlike atomics.
    """
    sorted_target, order = torch.sort(target, stable=True)
    bounds = torch.arange(rows + 1, device=src.device, dtype=sorted_target.dtype)
    offsets = torch.searchsorted(sorted_target, bounds)  # CSR row starts, no atomics
    out = torch.empty(rows, src.shape[1], device=src.device, dtype=torch.float32)
    _segment_sum_kernel[(rows,)](src, order, offsets, out, src.shape[1], BLOCK_W=pow2(src.shape[1], 1))
    return out
