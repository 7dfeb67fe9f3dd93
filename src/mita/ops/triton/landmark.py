"""Landmark side in one pass over K and V: scores ``S = R K^T c`` and shared values ``A = softmax(S) V``.

The scores are written once (float32, padding = -inf) so that the per-landmark top-k can run on them
with ``torch.topk``; the same scores feed an online softmax that accumulates ``A`` and its
log-sum-exp without a second read of K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, pow2


@triton.jit
def _landmark_fwd_kernel(
    R, K, V, MASK, S, A, LSE,
    n_kv, m, heads, kv_heads, group, scale,
    HAS_MASK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    b = bh // heads
    kvh = (b * kv_heads + (bh % heads) // group).to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < m
    lrow = bh.to(tl.int64) * m + offs_m
    r = tl.load(
        R + lrow[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, n_kv, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_kv
        krow = kvh * n_kv + offs_n
        kt = tl.load(
            K + krow[None, :] * D + offs_d[:, None], mask=n_ok[None, :] & (offs_d < D)[:, None], other=0.0
        )
        s = tl.dot(r, kt, input_precision=PREC) * scale
        valid = n_ok
        if HAS_MASK:
            pad = tl.load(MASK + b.to(tl.int64) * n_kv + offs_n, mask=n_ok, other=1)
            valid = valid & (pad == 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        tl.store(S + lrow[:, None] * n_kv + offs_n[None, :], s, mask=m_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A block of only padding leaves m_new = -inf; subtract 0 instead so exp gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_sub)
        p = tl.exp(s - m_sub[:, None])
        v = tl.load(
            V + krow[:, None] * DV + offs_dv[None, :], mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0
        )
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # Validation guarantees every batch row has a real key, so l_i > 0 for real landmarks.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(A + lrow[:, None] * DV + offs_dv[None, :], acc / l_safe[:, None],
             mask=m_ok[:, None] & (offs_dv < DV)[None, :])  # fmt: skip
    tl.store(LSE + lrow, m_i + tl.log(l_safe), mask=m_ok)


def landmark_forward(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, shared values and their log-sum-exp.

    Args:
        r: landmarks ``[B, H, m, d]``; k, v: ``[B, Hkv, N, d]`` / ``[B, Hkv, N, dv]`` (contiguous).
        mask: ``[B, N]`` uint8 (1 = padding) or None.
        scale: ``c`` applied to the scores.

    Returns:
        ``S`` [B, H, m, N] float32 (padding = -inf), ``A`` [B, H, m, dv] float32, ``lse`` [B, H, m] float32.
    """
    b, h, m, d = r.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    scores = torch.empty(b, h, m, n, device=r.device, dtype=torch.float32)
    values = torch.empty(b, h, m, dv, device=r.device, dtype=torch.float32)
    lse = torch.empty(b, h, m, device=r.device, dtype=torch.float32)
    block_m = min(64, pow2(m))
    grid = (b * h, triton.cdiv(m, block_m))
    _landmark_fwd_kernel[grid](
        r, k, v, mask if mask is not None else r, scores, values, lse,
        n, m, h, hkv, h // hkv, scale,
        HAS_MASK=mask is not None, D=d, DV=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv),
        BLOCK_M=block_m, BLOCK_N=64 if n >= 64 else pow2(n), PREC=dot_precision(r.dtype),
    )  # fmt: skip
    return scores, values, lse
