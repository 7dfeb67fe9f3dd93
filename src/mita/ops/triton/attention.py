"""Expert-major MiTA attention: every program owns one tile of queries routed to the same expert.

A tile reads its expert's ``k`` key indices and loads those rows of K and V *by index* (no gathered
copy), together with the ``m`` shared-expert entries (landmark logits ``QR^T * lambda`` computed once by
the routing step, and ``A``), and runs one online softmax over both. Outputs and the row log-sum-exp
are written in the original token order through the tile's row list. The backward kernel recomputes
the routed probabilities from that log-sum-exp: dQ is complete per tile (each query sits in exactly
one tile when s = 1, so no atomics), and dK/dV of the routed rows are either atomically added into
float32 buffers or written per tile for a deterministic segmented sum (:mod:`.scatter`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, pow2


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, QR, A, KEYS, MASK, TILE_EXPERT, TILE_ROWS, TILE_OK, O, LSE,
    n_kv, m, topk, heads, kv_heads, group, scale, lam,
    HAS_MASK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    e = tl.load(TILE_EXPERT + t)  # global expert id (b * H + h) * m + j
    bh = e // m
    b = bh // heads
    kvh = b * kv_heads + (bh % heads) // group
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    row = tl.load(TILE_ROWS + t * BLOCK_T + offs_t)  # global query rows (b * H + h) * N + n
    ok = tl.load(TILE_OK + t * BLOCK_T + offs_t) != 0

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_DV], tl.float32)
    if SHARED:
        for start in range(0, m, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m
            s = tl.load(QR + row[:, None] * m + offs_m[None, :], mask=ok[:, None] & m_ok[None, :], other=0.0)
            s = tl.where(m_ok[None, :], s * lam, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            a = tl.load(A + (bh * m + offs_m)[:, None] * DV + offs_dv[None, :],
                        mask=m_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, a, input_precision=PREC)
            m_i = m_new
    if ROUTED:
        q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        for start in range(0, topk, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            k_ok = offs_k < topk
            idx = tl.load(KEYS + e * topk + offs_k, mask=k_ok, other=0)
            krow = kvh * n_kv + idx
            kt = tl.load(
                K + krow[None, :] * D + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0
            )
            s = tl.dot(q, kt, input_precision=PREC) * scale
            valid = k_ok
            if HAS_MASK:
                valid = valid & (tl.load(MASK + b * n_kv + idx, mask=k_ok, other=1) == 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Only padding so far: subtract 0 so exp(-inf) = 0 instead of NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_sub)
            p = tl.exp(s - m_sub[:, None])
            v = tl.load(
                V + krow[:, None] * DV + offs_dv[None, :], mask=k_ok[:, None] & dv_ok[None, :], other=0.0
            )
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    # A row with nothing to attend to (routed-only and every chosen key padding) gets 0 and lse -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + row[:, None] * DV + offs_dv[None, :],
        out.to(O.dtype.element_ty),
        mask=ok[:, None] & dv_ok[None, :],
    )
    tl.store(LSE + row, tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf")), mask=ok)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, KEYS, MASK, TILE_EXPERT, TILE_ROWS, TILE_OK, DQ, DK, DV_,
    n_kv, m, topk, heads, kv_heads, group, scale,
    HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    e = tl.load(TILE_EXPERT + t)
    bh = e // m
    b = bh // heads
    kvh = b * kv_heads + (bh % heads) // group
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    row = tl.load(TILE_ROWS + t * BLOCK_T + offs_t)
    ok = tl.load(TILE_OK + t * BLOCK_T + offs_t) != 0
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + row[:, None] * DV + offs_dv[None, :], mask=ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + row, mask=ok, other=0.0)
    delta = tl.load(DELTA + row, mask=ok, other=0.0)
    # Rows with lse = -inf attended to nothing: give them zero probability everywhere.
    live = ok & (lse > float("-inf"))
    lse = tl.where(live, lse, 0.0)

    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for start in range(0, topk, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < topk
        idx = tl.load(KEYS + e * topk + offs_k, mask=k_ok, other=0)
        krow = kvh * n_kv + idx
        kt = tl.load(K + krow[None, :] * D + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + krow[:, None] * DV + offs_dv[None, :], mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * scale
        valid = k_ok
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * n_kv + idx, mask=k_ok, other=1) == 0)
        p = tl.where(live[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
        dv_c = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dk_c = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
        kv_mask_d = k_ok[:, None] & d_ok[None, :]
        kv_mask_dv = k_ok[:, None] & dv_ok[None, :]
        if ATOMIC:
            tl.atomic_add(DK + krow[:, None] * D + offs_d[None, :], dk_c, mask=kv_mask_d)
            tl.atomic_add(DV_ + krow[:, None] * DV + offs_dv[None, :], dv_c, mask=kv_mask_dv)
        else:
            slot = t * topk + offs_k
            tl.store(DK + slot[:, None] * D + offs_d[None, :], dk_c, mask=kv_mask_d)
            tl.store(DV_ + slot[:, None] * DV + offs_dv[None, :], dv_c, mask=kv_mask_dv)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], dq * scale, mask=ok[:, None] & d_ok[None, :])


def _blocks(t: torch.Tensor, m: int, topk: int, d: int, dv: int) -> dict:
    return {
        "D": d,
        "DV": dv,
        "BLOCK_D": pow2(d),
        "BLOCK_DV": pow2(dv),
        "BLOCK_K": min(64, pow2(topk)),
        "PREC": dot_precision(t.dtype),
    }


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qr: torch.Tensor,
    values: torch.Tensor,
    key_index: torch.Tensor,
    mask: torch.Tensor | None,
    tile_expert: torch.Tensor,
    tile_rows: torch.Tensor,
    tile_ok: torch.Tensor,
    *,
    scale: float,
    lam: float,
    shared: bool,
    routed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel over all tiles.

    Args:
        q: ``[B, H, N, d]``; k, v: ``[B, Hkv, N_kv, d|dv]``; qr: ``Q R^T`` ``[B, H, N, m]`` float32;
        values: ``A`` ``[B, H, m, dv]`` float32; key_index: ``[B, H, m, k]`` int64; mask: ``[B, N_kv]``
        uint8 or None; tile_expert ``[T]``, tile_rows/tile_ok ``[T, BLOCK_T]``: the tiling (all contiguous).

    Returns:
        ``O`` [B, H, N, dv] in q's dtype and the row log-sum-exp [B, H, N] float32.
    """
    b, h, n, d = q.shape
    hkv, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    m, topk = key_index.shape[2], key_index.shape[3]
    out = torch.empty(b, h, n, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    n_tiles, block_t = tile_rows.shape
    _attn_fwd_kernel[(n_tiles,)](
        q, k, v, qr, values, key_index, mask if mask is not None else tile_ok, tile_expert, tile_rows,
        tile_ok, out, lse,
        n_kv, m, topk, h, hkv, h // hkv, scale, lam,
        HAS_MASK=mask is not None, SHARED=shared, ROUTED=routed, BLOCK_T=block_t,
        BLOCK_M=min(64, pow2(m)), **_blocks(q, m, topk, d, dv),
    )  # fmt: skip
    return out, lse


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    key_index: torch.Tensor,
    mask: torch.Tensor | None,
    tile_expert: torch.Tensor,
    tile_rows: torch.Tensor,
    tile_ok: torch.Tensor,
    *,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed-part gradients: dQ ``[B, H, N, d]`` and dK/dV ``[B, Hkv, N_kv, d|dv]``, all float32.

    ``deterministic`` writes each tile's dK/dV rows to a buffer and reduces them per key in a fixed
    order (:func:`.scatter.segment_sum`); otherwise they are atomically added (faster, order-dependent
    rounding).
    """
    b, h, n, d = q.shape
    hkv, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    m, topk = key_index.shape[2], key_index.shape[3]
    n_tiles, block_t = tile_rows.shape
    dq = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32)
    if deterministic:
        dk_buf = torch.empty(n_tiles * topk, d, device=q.device, dtype=torch.float32)
        dv_buf = torch.empty(n_tiles * topk, dv, device=q.device, dtype=torch.float32)
    else:
        dk_buf = torch.zeros(b, hkv, n_kv, d, device=q.device, dtype=torch.float32)
        dv_buf = torch.zeros(b, hkv, n_kv, dv, device=q.device, dtype=torch.float32)
    _attn_bwd_kernel[(n_tiles,)](
        q, k, v, do, lse, delta, key_index, mask if mask is not None else tile_ok, tile_expert, tile_rows,
        tile_ok, dq, dk_buf, dv_buf,
        n_kv, m, topk, h, hkv, h // hkv, scale,
        HAS_MASK=mask is not None, ATOMIC=not deterministic, BLOCK_T=block_t,
        **_blocks(q, m, topk, d, dv),
    )  # fmt: skip
    if not deterministic:
        return dq, dk_buf, dv_buf
    from .scatter import segment_sum

    # Target row of every per-tile slot: the global key row its expert selected.
    bh = tile_expert // m
    kv_base = ((bh // h) * hkv + (bh % h) // (h // hkv)) * n_kv
    target = (kv_base.unsqueeze(1) + key_index.reshape(-1, topk).index_select(0, tile_expert)).reshape(-1)
    rows = b * hkv * n_kv
    dk = segment_sum(dk_buf, target, rows).reshape(b, hkv, n_kv, d)
    dvv = segment_sum(dv_buf, target, rows).reshape(b, hkv, n_kv, dv)
    return dq, dk, dvv
