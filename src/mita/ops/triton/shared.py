"""Gradients into the shared values A and the landmarks R through the shared logits ``q . r_j * lambda``.

These sum over every query of a head, so they run query-major (not per expert tile): a program owns a
block of landmarks and one chunk of the queries, recomputes ``P = exp(q . r * lambda - lse)`` from the
saved row log-sum-exp and accumulates ``dA += P^T dO`` and ``dR += lambda dS^T Q`` with
``dS = P (dO A^T - delta)``. Chunks are merged by a fixed-order sum, so this is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import load_cols, load_rows, store_rows
from .common import block, chunking, default_splits, dot_precision, pow2
from .launch import launch


@triton.jit
def _shared_bwd_kernel(
    Q, R, A, DO, LSE, DELTA, DA, DR,
    n_q, m, lam, chunk, splits,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    sp = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    m_ok = offs_m < m
    lrow = bh * m + offs_m
    r = load_rows(R, lrow, offs_d, D, m_ok, d_ok)
    a = load_rows(A, lrow, offs_dv, DV, m_ok, dv_ok)
    d_a = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    d_r = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(sp * chunk, tl.minimum(sp * chunk + chunk, n_q), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_q
        qrow = bh * n_q + offs_n
        qt = load_cols(Q, qrow, offs_d, D, n_ok, d_ok)  # [BLOCK_D, BLOCK_N]
        do = load_rows(DO, qrow, offs_dv, DV, n_ok, dv_ok).to(tl.float32)
        lse = tl.load(LSE + qrow, mask=n_ok, other=0.0)
        delta = tl.load(DELTA + qrow, mask=n_ok, other=0.0)
        s = tl.dot(r, qt, input_precision=PREC) * lam  # [BLOCK_M, BLOCK_N]
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[None, :]), 0.0)
        dp = tl.dot(a, tl.trans(do), input_precision=PREC)
        ds = p * (dp - delta[None, :])
        d_a += tl.dot(p, do, input_precision=PREC)
        d_r += tl.dot(ds.to(qt.dtype), tl.trans(qt), input_precision=PREC)
    prow = lrow * splits + sp
    store_rows(DA, prow, offs_dv, DV, m_ok, dv_ok, d_a)
    store_rows(DR, prow, offs_d, D, m_ok, d_ok, d_r * lam)


def shared_backward(
    q: torch.Tensor,
    r: torch.Tensor,
    values: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    lam: float,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA ``[B, H, m, dv]`` and the shared-logit part of dR ``[B, H, m, d]``, float32.

    Args:
        q: ``[B, H, N, d]``; r: ``[B, H, m, d]``; values: A ``[B, H, m, dv]`` float32; do: ``[B, H, N, dv]``;
        lse, delta: ``[B, H, N]`` float32 (row log-sum-exp and ``rowsum(dO * O)``); lam: landmark scale.
        splits: query chunks reduced by separate programs (default: enough to fill the GPU).
    """
    b, h, n, d = q.shape
    m, dv = r.shape[2], values.shape[3]
    block_m, block_n = block(m), block(n)
    m_blocks = triton.cdiv(m, block_m)
    chunk, splits = chunking(n, splits or default_splits(b * h * m_blocks, n, q.device), block_n)
    d_a = torch.empty(b, h, m, splits, dv, device=q.device, dtype=torch.float32)
    d_r = torch.empty(b, h, m, splits, d, device=q.device, dtype=torch.float32)
    args = (q, r, values, do, lse, delta, d_a, d_r, n, m, lam, chunk, splits)
    consts = dict(
        D=d, DV=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), BLOCK_M=block_m, BLOCK_N=block_n,
        PREC=dot_precision(q.dtype),
    )  # fmt: skip
    launch(_shared_bwd_kernel, (b * h, m_blocks, splits), args, consts, loop_blocks=("BLOCK_N",))
    return d_a.sum(3), d_r.sum(3)
