"""Routing kernel: each query's best landmark, ``argmax_j q . r_j``, without storing ``Q R^T``.

The attention kernels recompute the ``T x m`` shared logits of their tile from R (loaded once per
tile) instead of reading an ``N x m`` float32 tensor back: fewer bytes moved and no ``N x m`` buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import load_cols, load_rows
from .common import block, dot_precision, pow2
from .launch import launch


@triton.jit
def _route_kernel(
    Q, R, EXPERT, n_q, m,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n_q
    qrow = bh * n_q + offs_n
    q = load_rows(Q, qrow, offs_d, D, n_ok, offs_d < D)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_j = tl.zeros([BLOCK_N], tl.int64)
    for start in range(0, m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m
        rt = load_cols(R, bh * m + offs_m, offs_d, D, m_ok, offs_d < D)
        s = tl.where(m_ok[None, :], tl.dot(q, rt, input_precision=PREC), float("-inf"))
        blk_best, blk_j = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
        better = blk_best > best  # strict: on a tie the earlier landmark stays, as torch.topk does
        best_j = tl.where(better, start + blk_j.to(tl.int64), best_j)
        best = tl.where(better, blk_best, best)
    tl.store(EXPERT + qrow, best_j, mask=n_ok)


def route(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Each query's expert ``argmax_j q . r_j``: int64 ``[B, H, N, 1]`` for q ``[B, H, N, d]``."""
    b, h, n, d = q.shape
    m = r.shape[2]
    expert = torch.empty(b, h, n, 1, device=q.device, dtype=torch.int64)
    block_n = block(n)
    consts = dict(D=d, BLOCK_D=pow2(d), BLOCK_N=block_n, BLOCK_M=block(m), PREC=dot_precision(q.dtype))
    grid = (b * h, triton.cdiv(n, block_n))
    launch(_route_kernel, grid, (q, r, expert, n, m), consts, loop_blocks=("BLOCK_M",))
    return expert
