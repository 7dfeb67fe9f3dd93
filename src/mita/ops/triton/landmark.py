"""Landmark side: scores ``S = R K^T c``, per-landmark top-k keys and shared values ``A = softmax(S) V``.

Forward: one pass over K and V per head computes S once; it is written (float32, padding = -inf) for
``torch.topk`` and feeds an online softmax that accumulates A and its log-sum-exp. Long key ranges
are split over programs and merged by log-sum-exp; heads go in groups so the score buffer stays
bounded. Backward: two kernels recompute the probabilities block by block (nothing ``m x N`` is
kept): a key-major one adds dK/dV per key row (no atomics) and a landmark-major one produces dR per
key chunk, summed in a fixed order.

GQA is folded away before the kernels run: the ``g`` query heads of a kv head are adjacent in memory,
so their landmarks form one block of ``g * m`` rows scored against the same keys. The kernels
therefore see one landmark head per kv head and read K and V once for all ``g`` of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    block,
    chunking,
    default_splits,
    dot_precision,
    launch,
    load_cols,
    load_rows,
    pow2,
    store_rows,
)


@triton.heuristics({"HAS_MASK": lambda args: args["MASK"] is not None})
@triton.jit
def landmark_fwd_kernel(
    R, K, V, MASK, S, A, LSE,
    n_kv, m, heads, scale, chunk, splits, bh0,
    HAS_MASK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    # Heads bh0 .. bh0 + grid[0] - 1 (one per kv head); S holds only these heads (bounded score buffer).
    bh = (bh0 + tl.program_id(0)).to(tl.int64)
    mb = tl.program_id(1)
    sp = tl.program_id(2)  # which chunk of the keys this program reduces (split over N for long inputs)
    b = bh // heads
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    m_ok = offs_m < m
    lrow = bh * m + offs_m
    r = load_rows(R, lrow, offs_d, D, m_ok, d_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    srow = tl.program_id(0).to(tl.int64) * m + offs_m
    for start in range(sp * chunk, tl.minimum(sp * chunk + chunk, n_kv), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_kv
        krow = bh * n_kv + offs_n
        kt = load_cols(K, krow, offs_d, D, n_ok, d_ok)
        s = tl.dot(r, kt, input_precision=PREC) * scale
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * n_kv + offs_n, mask=n_ok, other=1) == 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        store_rows(S, srow, offs_n, n_kv, m_ok, n_ok, s)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A block of only padding leaves m_new = -inf; subtract 0 instead so exp gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_sub)
        p = tl.exp(s - m_sub[:, None])
        v = load_rows(V, krow, offs_dv, DV, n_ok, dv_ok)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # A chunk of only padding has l_i = 0: partial value 0 with lse -inf (weight 0 when merged).
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    prow = lrow * splits + sp
    store_rows(A, prow, offs_dv, DV, m_ok, dv_ok, acc / l_safe[:, None])
    tl.store(LSE + prow, tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf")), mask=m_ok)


@triton.heuristics({"HAS_MASK": lambda args: args["MASK"] is not None})
@triton.jit
def landmark_bwd_kv_kernel(
    R, K, V, MASK, LSE, DA, DL, DK, DV_,
    n_kv, m, heads, scale,
    HAS_MASK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Key-major: a program owns a block of key rows of one kv head and loops over all its landmarks
    # (the g * m rows of the query heads sharing it), so it adds into its dK/dV rows without atomics.
    bh = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = bh // heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    n_ok = offs_n < n_kv
    valid = n_ok
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b * n_kv + offs_n, mask=n_ok, other=1) == 0)
    krow = bh * n_kv + offs_n
    k = load_rows(K, krow, offs_d, D, n_ok, d_ok)
    v = load_rows(V, krow, offs_dv, DV, n_ok, dv_ok).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m
        lrow = bh * m + offs_m
        r = load_rows(R, lrow, offs_d, D, m_ok, d_ok)
        lse = tl.load(LSE + lrow, mask=m_ok, other=0.0)
        dl = tl.load(DL + lrow, mask=m_ok, other=0.0)
        d_a = load_rows(DA, lrow, offs_dv, DV, m_ok, dv_ok)
        s = tl.dot(r, tl.trans(k), input_precision=PREC) * scale  # [BLOCK_M, BLOCK_N]
        p = tl.where(m_ok[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(d_a, tl.trans(v), input_precision=PREC) - dl[:, None])
        dv += tl.dot(tl.trans(p), d_a, input_precision=PREC)
        dk += tl.dot(tl.trans(ds.to(r.dtype)), r, input_precision=PREC)
    store_rows(DK, krow, offs_d, D, n_ok, d_ok, load_rows(DK, krow, offs_d, D, n_ok, d_ok) + dk * scale)
    store_rows(DV_, krow, offs_dv, DV, n_ok, dv_ok, load_rows(DV_, krow, offs_dv, DV, n_ok, dv_ok) + dv)


@triton.heuristics({"HAS_MASK": lambda args: args["MASK"] is not None})
@triton.jit
def landmark_bwd_r_kernel(
    R, K, V, MASK, LSE, DA, DL, DR,
    n_kv, m, heads, scale, chunk, splits,
    HAS_MASK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Landmark-major: a program owns a block of landmarks and one chunk of the keys; chunks are
    # summed afterwards in a fixed order.
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    sp = tl.program_id(2)
    b = bh // heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    m_ok = offs_m < m
    lrow = bh * m + offs_m
    r = load_rows(R, lrow, offs_d, D, m_ok, d_ok)
    lse = tl.load(LSE + lrow, mask=m_ok, other=0.0)
    dl = tl.load(DL + lrow, mask=m_ok, other=0.0)
    d_a = load_rows(DA, lrow, offs_dv, DV, m_ok, dv_ok)
    dr = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(sp * chunk, tl.minimum(sp * chunk + chunk, n_kv), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_kv
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * n_kv + offs_n, mask=n_ok, other=1) == 0)
        krow = bh * n_kv + offs_n
        kt = load_cols(K, krow, offs_d, D, n_ok, d_ok)
        v = load_rows(V, krow, offs_dv, DV, n_ok, dv_ok).to(tl.float32)
        s = tl.dot(r, kt, input_precision=PREC) * scale
        p = tl.where(m_ok[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(d_a, tl.trans(v), input_precision=PREC) - dl[:, None])
        dr += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    store_rows(DR, lrow * splits + sp, offs_d, D, m_ok, d_ok, dr * scale)


def _meta(r: torch.Tensor, dv: int, block_m: int, block_n: int) -> dict:
    d = r.shape[-1]
    return dict(
        D=d, DV=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), BLOCK_M=block_m, BLOCK_N=block_n,
        PREC=dot_precision(r.dtype),
    )  # fmt: skip


def landmark_fwd(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    topk: int,
    splits: int | None = None,
    score_bytes: int = 1 << 28,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k keys per landmark, shared values and their log-sum-exp.

    Args:
        r: landmarks ``[B, H, m, d]``; k, v: ``[B, Hkv, N, d]`` / ``[B, Hkv, N, dv]`` (contiguous).
        mask: ``[B, N]`` uint8 (1 = padding) or None.
        scale: ``c`` applied to the scores.
        topk: keys kept per landmark (``torch.topk`` on the float32 scores; padding scores -inf).
        splits: key chunks reduced by separate programs and merged by log-sum-exp
            (default: enough programs to fill the GPU).
        score_bytes: cap on the float32 score buffer; heads are processed in groups that fit in it,
            so the ``m x N`` scores never exist for all heads at once.

    Returns:
        ``key_index`` [B, H, m, topk] int64, ``A`` [B, H, m, dv] float32, ``lse`` [B, H, m] float32.
    """
    b, h0, m0, d = r.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    h, m = hkv, (h0 // hkv) * m0  # GQA folded: g * m landmark rows per kv head
    r = r.reshape(b, h, m, d)
    bh = b * h
    block_m, block_n = block(m), block(n)
    m_blocks = triton.cdiv(m, block_m)
    chunk, splits = chunking(n, splits or default_splits(bh * m_blocks, n, r.device), block_n)
    heads_per_pass = max(1, min(bh, score_bytes // (4 * m * n)))
    scores = torch.empty(heads_per_pass, m, n, device=r.device, dtype=torch.float32)
    key_index = torch.empty(bh, m, topk, device=r.device, dtype=torch.int64)
    part = torch.empty(b, h, m, splits, dv, device=r.device, dtype=torch.float32)
    part_lse = torch.empty(b, h, m, splits, device=r.device, dtype=torch.float32)
    meta = _meta(r, dv, block_m, block_n)
    for bh0 in range(0, bh, heads_per_pass):  # static loop: sizes only, no host sync
        count = min(heads_per_pass, bh - bh0)
        args = dict(
            R=r, K=k, V=v, MASK=mask, S=scores, A=part, LSE=part_lse,
            n_kv=n, m=m, heads=h, scale=scale, chunk=chunk, splits=splits, bh0=bh0,
        )  # fmt: skip
        launch(landmark_fwd_kernel, (count, m_blocks, splits), args, meta, loop_blocks=("BLOCK_N",))
        key_index[bh0 : bh0 + count] = scores[:count].topk(topk, dim=-1, sorted=False).indices
    shape = (b, h0, m0)  # back to [B, H, m]
    key_index = key_index.reshape(*shape, topk)
    if splits == 1:
        return key_index, part.reshape(*shape, dv), part_lse.reshape(shape)
    lse = torch.logsumexp(part_lse, dim=-1)  # finite: every batch row has a real key
    weight = torch.exp(part_lse - lse.unsqueeze(-1))
    return key_index, (weight.unsqueeze(-1) * part).sum(-2).reshape(*shape, dv), lse.reshape(shape)


def landmark_bwd(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    values: torch.Tensor,
    lse: torch.Tensor,
    d_values: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    splits: int | None = None,
) -> torch.Tensor:
    """Backward of ``A = softmax(R K^T c) V`` given dA: adds into ``dk``/``dv`` (float32, in place) and
    returns dR ``[B, H, m, d]`` float32. ``lse`` is the landmark log-sum-exp from :func:`landmark_fwd`.

    Nothing of size ``m x N`` is stored: both kernels recompute the probabilities block by block.
    """
    b, h0, m0, d = r.shape
    hkv, n, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    h, m = hkv, (h0 // hkv) * m0  # GQA folded as in the forward
    r, values, d_values, lse = (t.reshape(b, h, m, *t.shape[3:]) for t in (r, values, d_values, lse))
    d_l = (d_values * values).sum(-1)  # rowsum(dA * A): the softmax-backward correction per landmark
    block_m, block_n = block(m), block(n)
    meta = _meta(r, dv_dim, block_m, block_n)
    shared = dict(R=r, K=k, V=v, MASK=mask, LSE=lse, DA=d_values, DL=d_l, n_kv=n, m=m, heads=h, scale=scale)
    grid = (b * h, triton.cdiv(n, block_n))
    launch(landmark_bwd_kv_kernel, grid, dict(**shared, DK=dk, DV_=dv), meta, loop_blocks=("BLOCK_M",))
    m_blocks = triton.cdiv(m, block_m)
    chunk, splits = chunking(n, splits or default_splits(b * h * m_blocks, n, r.device), block_n)
    d_r = torch.empty(b, h, m, splits, d, device=r.device, dtype=torch.float32)
    args = dict(**shared, DR=d_r, chunk=chunk, splits=splits)
    launch(landmark_bwd_r_kernel, (b * h, m_blocks, splits), args, meta, loop_blocks=("BLOCK_N",))
    return d_r.sum(3).reshape(b, h0, m0, d)
