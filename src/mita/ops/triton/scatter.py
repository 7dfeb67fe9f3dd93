"""Deterministic scatter-add: ``out[target[i]] += src[i]`` with a fixed summation order per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import load_rows, store_rows
from .common import pow2


@triton.jit
def _segment_sum_kernel(SRC, ORDER, OFFSETS, OUT, rows, width, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # A block of output rows; step i adds the i-th contribution of every row that has one, so each
    # row sums its contributions in sorted (= source) order whatever the block layout.
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.arange(0, BLOCK_W)
    w_ok = offs_w < width
    r_ok = offs_r < rows
    start = tl.load(OFFSETS + offs_r, mask=r_ok, other=0)
    count = tl.load(OFFSETS + offs_r + 1, mask=r_ok, other=0) - start
    acc = tl.zeros([BLOCK_R, BLOCK_W], tl.float32)
    for i in range(0, tl.max(count, 0)):
        has = i < count
        src_row = tl.load(ORDER + start + i, mask=has, other=0)
        acc += load_rows(SRC, src_row, offs_w, width, has, w_ok)
    store_rows(OUT, offs_r, offs_w, width, r_ok, w_ok, acc)


def segment_sum(src: torch.Tensor, target: torch.Tensor, rows: int) -> torch.Tensor:
    """Sum the rows of ``src`` [L, W] (float32) into ``rows`` output rows by ``target`` [L] (int64).

    Contributions are sorted by target with a stable sort, so every output row adds its
    contributions in source order: the result is bitwise reproducible, unlike atomics.
    """
    sorted_target, order = torch.sort(target, stable=True)
    bounds = torch.arange(rows + 1, device=src.device, dtype=sorted_target.dtype)
    offsets = torch.searchsorted(sorted_target, bounds)  # CSR row starts, no atomics
    out = torch.empty(rows, src.shape[1], device=src.device, dtype=torch.float32)
    block_r = 16
    _segment_sum_kernel[(triton.cdiv(rows, block_r),)](
        src, order, offsets, out, rows, src.shape[1], BLOCK_R=block_r, BLOCK_W=pow2(src.shape[1], 1)
    )
    return out
