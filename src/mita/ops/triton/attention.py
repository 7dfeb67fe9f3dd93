"""Expert-major MiTA attention: every program owns one tile of queries routed to the same expert.

A tile loads its queries by row index, the ``m`` landmarks R and shared values A of its (batch, head)
once, and its expert's ``k`` keys and values *by index* (no gathered copy). It computes the shared
logits ``q . r_j * lambda`` and the routed logits ``q . K_t * c`` and runs one online softmax over both,
writing O and the row log-sum-exp in the original token order through the tile's row list.

The backward kernel recomputes both probability blocks from that log-sum-exp. dQ is complete per tile
(each query sits in exactly one tile when s = 1, so no atomics). dK/dV of the routed rows are either
atomically added into float32 buffers or written per tile for a deterministic segmented sum
(:mod:`.scatter`). The gradients into A and R through the shared logits need sums over all queries of
a head; they are reduced query-major by :mod:`.shared`, not here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import add_rows, load_cols, load_rows, store_rows
from .common import block, dot_precision, pow2
from .launch import launch


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, R, A, KEYS, MASK, TILE_EXPERT, TILE_ROWS, TILE_OK, O, LSE,
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
    ok = tl.load(TILE_OK + t * BLOCK_T + offs_t) != 0
    if tl.max(ok.to(tl.int32), 0) == 0:
        return  # one of the empty tiles left over by the static tile-count bound
    row = tl.load(TILE_ROWS + t * BLOCK_T + offs_t)  # global query rows (b * H + h) * N + n
    q = load_rows(Q, row, offs_d, D, ok, d_ok)

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_DV], tl.float32)
    if SHARED:
        for start in range(0, m, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m
            lrow = bh * m + offs_m
            rt = load_cols(R, lrow, offs_d, D, m_ok, d_ok)
            s = tl.where(m_ok[None, :], tl.dot(q, rt, input_precision=PREC) * lam, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a real landmark
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            a = load_rows(A, lrow, offs_dv, DV, m_ok, dv_ok)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, a, input_precision=PREC)
            m_i = m_new
    if ROUTED:
        for start in range(0, topk, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            k_ok = offs_k < topk
            idx = tl.load(KEYS + e * topk + offs_k, mask=k_ok, other=0)
            krow = kvh * n_kv + idx
            kt = load_cols(K, krow, offs_d, D, k_ok, d_ok)
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
            v = load_rows(V, krow, offs_dv, DV, k_ok, dv_ok)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    # A row with nothing to attend to (routed-only and every chosen key padding) gets 0 and lse -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    store_rows(O, row, offs_dv, DV, ok, dv_ok, out.to(O.dtype.element_ty))
    tl.store(LSE + row, tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf")), mask=ok)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, R, A, DO, LSE, DELTA, KEYS, MASK, TILE_EXPERT, TILE_ROWS, TILE_OK, DQ, DK, DV_,
    n_kv, m, topk, heads, kv_heads, group, scale, lam,
    HAS_MASK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, ATOMIC: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
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
    ok = tl.load(TILE_OK + t * BLOCK_T + offs_t) != 0
    if tl.max(ok.to(tl.int32), 0) == 0:
        return
    row = tl.load(TILE_ROWS + t * BLOCK_T + offs_t)
    q = load_rows(Q, row, offs_d, D, ok, d_ok)
    do = load_rows(DO, row, offs_dv, DV, ok, dv_ok)
    lse = tl.load(LSE + row, mask=ok, other=0.0)
    delta = tl.load(DELTA + row, mask=ok, other=0.0)
    # Rows with lse = -inf attended to nothing: give them zero probability everywhere.
    live = ok & (lse > float("-inf"))
    lse = tl.where(live, lse, 0.0)

    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    if SHARED:
        do32 = do.to(tl.float32)
        for start in range(0, m, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m
            lrow = bh * m + offs_m
            rt = load_cols(R, lrow, offs_d, D, m_ok, d_ok)
            a = load_rows(A, lrow, offs_dv, DV, m_ok, dv_ok)
            s = tl.dot(q, rt, input_precision=PREC) * lam
            p = tl.where(live[:, None] & m_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do32, tl.trans(a), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(rt.dtype), tl.trans(rt), input_precision=PREC) * lam
    if ROUTED:
        for start in range(0, topk, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            k_ok = offs_k < topk
            idx = tl.load(KEYS + e * topk + offs_k, mask=k_ok, other=0)
            krow = kvh * n_kv + idx
            kt = load_cols(K, krow, offs_d, D, k_ok, d_ok)
            v = load_rows(V, krow, offs_dv, DV, k_ok, dv_ok)
            s = tl.dot(q, kt, input_precision=PREC) * scale
            valid = k_ok
            if HAS_MASK:
                valid = valid & (tl.load(MASK + b * n_kv + idx, mask=k_ok, other=1) == 0)
            p = tl.where(live[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC) * scale
            dv_c = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk_c = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
            if ATOMIC:
                add_rows(DK, krow, offs_d, D, k_ok, d_ok, dk_c)
                add_rows(DV_, krow, offs_dv, DV, k_ok, dv_ok, dv_c)
            else:
                slot = t * topk + offs_k
                store_rows(DK, slot, offs_d, D, k_ok, d_ok, dk_c)
                store_rows(DV_, slot, offs_dv, DV, k_ok, dv_ok, dv_c)
    store_rows(DQ, row, offs_d, D, ok, d_ok, dq)


def _consts(q: torch.Tensor, m: int, topk: int, dv: int, block_t: int) -> dict:
    d = q.shape[3]
    return {
        "D": d,
        "DV": dv,
        "BLOCK_D": pow2(d),
        "BLOCK_DV": pow2(dv),
        "BLOCK_T": block_t,
        "BLOCK_M": block(m),
        "BLOCK_K": block(topk),
        "PREC": dot_precision(q.dtype),
        "num_warps": 4 if max(d, dv) <= 64 else 8,
    }


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    values: torch.Tensor,
    key_index: torch.Tensor,
    mask: torch.Tensor | None,
    tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    scale: float,
    lam: float,
    shared: bool,
    routed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel over all tiles.

    Args:
        q: ``[B, H, N, d]``; k, v: ``[B, Hkv, N_kv, d|dv]``; r: landmarks ``[B, H, m, d]``;
        values: ``A`` ``[B, H, m, dv]`` float32; key_index: ``[B, H, m, k]`` int64; mask: ``[B, N_kv]``
        uint8 or None; tiles: expert ``[T]``, query rows and valid flags ``[T, tile]`` (all contiguous).

    Returns:
        ``O`` [B, H, N, dv] in q's dtype and the row log-sum-exp [B, H, N] float32.
    """
    b, h, n, _ = q.shape
    hkv, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    m, topk = key_index.shape[2], key_index.shape[3]
    tile_expert, tile_rows, tile_ok = tiles
    out = torch.empty(b, h, n, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    args = (
        q, k, v, r, values, key_index, mask if mask is not None else tile_ok, tile_expert, tile_rows,
        tile_ok, out, lse,
        n_kv, m, topk, h, hkv, h // hkv, scale, lam,
    )  # fmt: skip
    consts = dict(
        HAS_MASK=mask is not None, SHARED=shared, ROUTED=routed, **_consts(q, m, topk, dv, tile_rows.shape[1])
    )
    launch(_attn_fwd_kernel, (tile_rows.shape[0],), args, consts, loop_blocks=("BLOCK_M", "BLOCK_K"))
    return out, lse


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    values: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    key_index: torch.Tensor,
    mask: torch.Tensor | None,
    tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    scale: float,
    lam: float,
    shared: bool,
    routed: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ ``[B, H, N, d]`` (shared and routed) and the routed dK/dV ``[B, Hkv, N_kv, d|dv]``, float32.

    ``deterministic`` writes each tile's dK/dV rows to a buffer and reduces them per key in a fixed
    order (:func:`.scatter.segment_sum`); otherwise they are atomically added (faster, order-dependent
    rounding).
    """
    b, h, n, d = q.shape
    hkv, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    m, topk = key_index.shape[2], key_index.shape[3]
    tile_expert, tile_rows, tile_ok = tiles
    n_tiles = tile_rows.shape[0]
    dq = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32)
    if deterministic and routed:
        dk_buf = torch.empty(n_tiles * topk, d, device=q.device, dtype=torch.float32)
        dv_buf = torch.empty(n_tiles * topk, dv, device=q.device, dtype=torch.float32)
    else:
        dk_buf = torch.zeros(b, hkv, n_kv, d, device=q.device, dtype=torch.float32)
        dv_buf = torch.zeros(b, hkv, n_kv, dv, device=q.device, dtype=torch.float32)
    args = (
        q, k, v, r, values, do, lse, delta, key_index, mask if mask is not None else tile_ok, tile_expert,
        tile_rows, tile_ok, dq, dk_buf, dv_buf,
        n_kv, m, topk, h, hkv, h // hkv, scale, lam,
    )  # fmt: skip
    consts = dict(
        HAS_MASK=mask is not None, SHARED=shared, ROUTED=routed, ATOMIC=not deterministic,
        **_consts(q, m, topk, dv, tile_rows.shape[1]),
    )
    launch(_attn_bwd_kernel, (n_tiles,), args, consts, loop_blocks=("BLOCK_M", "BLOCK_K"))
    if not (deterministic and routed):
        return dq, dk_buf, dv_buf
    from .scatter import segment_sum

    # Target row of every per-tile slot: the global key row its expert selected.
    bh = tile_expert // m
    kv_base = ((bh // h) * hkv + (bh % h) // (h // hkv)) * n_kv
    target = kv_base.unsqueeze(1) + key_index.reshape(-1, topk).index_select(0, tile_expert)
    rows = b * hkv * n_kv
    # Empty tiles (from the static tile-count bound) exit early and leave their slots unwritten:
    # send those slots to a spare row that is dropped.
    target = torch.where(tile_ok.bool().any(1, keepdim=True), target, rows).reshape(-1)
    dk = segment_sum(dk_buf, target, rows + 1)[:rows].reshape(b, hkv, n_kv, d)
    dvv = segment_sum(dv_buf, target, rows + 1)[:rows].reshape(b, hkv, n_kv, dv)
    return dq, dk, dvv
