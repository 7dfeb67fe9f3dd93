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
    n_kv, m, heads, kv_heads, group, scale, chunk, splits,
    HAS_MASK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    sp = tl.program_id(2)  # which chunk of the keys this program reduces (split over N for long inputs)
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
    for start in range(sp * chunk, tl.minimum(sp * chunk + chunk, n_kv), BLOCK_N):
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
    # A chunk of only padding has l_i = 0: partial value 0 with lse -inf (weight 0 when merged).
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    prow = lrow * splits + sp
    tl.store(A + prow[:, None] * DV + offs_dv[None, :], acc / l_safe[:, None],
             mask=m_ok[:, None] & (offs_dv < DV)[None, :])  # fmt: skip
    tl.store(LSE + prow, tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf")), mask=m_ok)


def default_splits(bh: int, m_blocks: int, n: int, device: torch.device) -> int:
    """Chunks of the keys reduced in parallel: enough programs to fill a GPU (about 4 per SM), but
    at least 1024 keys per chunk; 1 on CPU (the interpreter gains nothing from splitting)."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, bh * m_blocks), triton.cdiv(n, 1024)))


def landmark_forward(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, shared values and their log-sum-exp.

    Args:
        r: landmarks ``[B, H, m, d]``; k, v: ``[B, Hkv, N, d]`` / ``[B, Hkv, N, dv]`` (contiguous).
        mask: ``[B, N]`` uint8 (1 = padding) or None.
        scale: ``c`` applied to the scores.
        splits: key chunks reduced by separate programs and merged by log-sum-exp
            (default :func:`default_splits`).

    Returns:
        ``S`` [B, H, m, N] float32 (padding = -inf), ``A`` [B, H, m, dv] float32, ``lse`` [B, H, m] float32.
    """
    b, h, m, d = r.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    block_m = min(64, pow2(m))
    block_n = 64 if n >= 64 else pow2(n)
    m_blocks = triton.cdiv(m, block_m)
    splits = splits or default_splits(b * h, m_blocks, n, r.device)
    chunk = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n  # whole key blocks per chunk
    splits = triton.cdiv(n, chunk)
    scores = torch.empty(b, h, m, n, device=r.device, dtype=torch.float32)
    part = torch.empty(b, h, m, splits, dv, device=r.device, dtype=torch.float32)
    part_lse = torch.empty(b, h, m, splits, device=r.device, dtype=torch.float32)
    _landmark_fwd_kernel[(b * h, m_blocks, splits)](
        r, k, v, mask if mask is not None else r, scores, part, part_lse,
        n, m, h, hkv, h // hkv, scale, chunk, splits,
        HAS_MASK=mask is not None, D=d, DV=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv),
        BLOCK_M=block_m, BLOCK_N=block_n, PREC=dot_precision(r.dtype),
    )  # fmt: skip
    if splits == 1:
        return scores, part.squeeze(3), part_lse.squeeze(3)
    lse = torch.logsumexp(part_lse, dim=-1)  # finite: every batch row has a real key
    weight = torch.exp(part_lse - lse.unsqueeze(-1))
    return scores, (weight.unsqueeze(-1) * part).sum(-2), lse
