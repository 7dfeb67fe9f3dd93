"""MiTA attention in Triton, forward and backward, over tiles of queries that share one routed expert.

Forward (:func:`mita_fwd`): the landmark side (:mod:`.landmark`) gives each landmark's top-k keys and
the shared values A; :func:`route` gives each query's expert ``argmax_j q . r_j`` without storing
``Q R^T``; queries are packed into tiles sharing one expert (device sort, static tile count, no host
sync); and the attention kernel runs one online softmax per tile over the ``m`` shared logits
``q . r_j * lambda`` (recomputed from R, loaded once per tile) and the expert's ``k`` routed logits
``q . K_t * c`` (keys and values loaded *by index*, no gathered copy). O and the row log-sum-exp are
written in token order through the tile's row list.

Backward (:func:`mita_bwd`): the tile kernel recomputes both probability blocks from that
log-sum-exp. dQ is complete per tile (each query sits in exactly one tile when s = 1, so no atomics);
dK/dV of the routed rows are atomically added into float32 buffers, or written per tile and summed per
key in a fixed order (:func:`segment_sum`) when ``torch.are_deterministic_algorithms_enabled()``. dA
and the shared-logit part of dR sum over every query of a head, so a query-major kernel
(:func:`shared_bwd`) reduces them; the landmark side then adds its dR, dK, dV through A.

Order of this file: kernels, launchers (``*_fwd`` / ``*_bwd``), the ``autograd.Function``, and the
public :func:`parallel_mita`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import ExpertTiles, Problem, Routing, default_tile_size
from .landmark import landmark_bwd, landmark_fwd
from .utils import (
    add_rows,
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

# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def route_kernel(
    Q, R, EXPERT, n_q, m,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Each query's best landmark with a running max over landmark blocks; Q R^T is never stored.
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


@triton.heuristics({"HAS_MASK": lambda args: args["MASK"] is not None})
@triton.jit
def attn_fwd_kernel(
    Q, K, V, R, A, KEYS, MASK, TILE_EXPERT, TILE_ROWS, TILE_OK, O, LSE,
    n_kv, m, topk, heads, kv_heads, scale, lam,
    HAS_MASK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    e = tl.load(TILE_EXPERT + t)  # global expert id (b * H + h) * m + j
    bh = e // m
    b = bh // heads
    kvh = b * kv_heads + (bh % heads) // (heads // kv_heads)
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


@triton.heuristics({"HAS_MASK": lambda args: args["MASK"] is not None})
@triton.jit
def attn_bwd_kernel(
    Q, K, V, R, A, DO, LSE, DELTA, KEYS, MASK, TILE_EXPERT, TILE_ROWS, TILE_OK, DQ, DK, DV_,
    n_kv, m, topk, heads, kv_heads, scale, lam,
    HAS_MASK: tl.constexpr, SHARED: tl.constexpr, ROUTED: tl.constexpr, ATOMIC: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    e = tl.load(TILE_EXPERT + t)
    bh = e // m
    b = bh // heads
    kvh = b * kv_heads + (bh % heads) // (heads // kv_heads)
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


@triton.jit
def shared_bwd_kernel(
    Q, R, A, DO, LSE, DELTA, DA, DR,
    n_q, m, lam, chunk, splits,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Query-major: a block of landmarks and one chunk of the queries; P = exp(q . r * lambda - lse)
    # from the row log-sum-exp, dA += P^T dO and dR += lambda dS^T Q with dS = P (dO A^T - delta).
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


@triton.jit
def segment_sum_kernel(SRC, ORDER, OFFSETS, OUT, rows, width, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
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


# --------------------------------------------------------------------------------------- launchers


def route(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Each query's expert ``argmax_j q . r_j``: int64 ``[B, H, N, 1]`` for q ``[B, H, N, d]``."""
    b, h, n, d = q.shape
    m = r.shape[2]
    expert = torch.empty(b, h, n, 1, device=q.device, dtype=torch.int64)
    block_n = block(n)
    meta = dict(D=d, BLOCK_D=pow2(d), BLOCK_N=block_n, BLOCK_M=block(m), PREC=dot_precision(q.dtype))
    grid = (b * h, triton.cdiv(n, block_n))
    launch(route_kernel, grid, dict(Q=q, R=r, EXPERT=expert, n_q=n, m=m), meta, loop_blocks=("BLOCK_M",))
    return expert


def tiling(p: Problem, expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of queries sharing one expert: expert id [T], global query rows and valid flags [T, tile]."""
    bh, m = p.batch * p.heads, p.num_landmarks
    base = torch.arange(bh, device=expert_index.device).reshape(p.batch, p.heads, 1) * m
    experts = (base + expert_index[..., 0]).reshape(-1)  # s = 1: pair index == global query row
    tile = max(16, default_tile_size(p.q_len, m))  # tl.dot needs >= 16 rows
    tiles = ExpertTiles(experts, bh * m, tile)
    return tiles.expert.contiguous(), tiles.pair.contiguous(), tiles.valid.to(torch.uint8).contiguous()


def _attn_meta(q: torch.Tensor, p: Problem, block_t: int) -> dict:
    d, dv = p.head_dim, p.value_dim
    return dict(
        SHARED=p.shared, ROUTED=p.routed, D=d, DV=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), BLOCK_T=block_t,
        BLOCK_M=block(p.num_landmarks), BLOCK_K=block(p.topk), PREC=dot_precision(q.dtype),
        num_warps=4 if max(d, dv) <= 64 else 8,
    )  # fmt: skip


def _attn_args(p: Problem, q, k, v, r, values, key_index, mask, tiles) -> dict:
    tile_expert, tile_rows, tile_ok = tiles
    return dict(
        Q=q, K=k, V=v, R=r, A=values, KEYS=key_index, MASK=mask,
        TILE_EXPERT=tile_expert, TILE_ROWS=tile_rows, TILE_OK=tile_ok,
        n_kv=p.kv_len, m=p.num_landmarks, topk=p.topk, heads=p.heads, kv_heads=p.kv_heads,
        scale=p.scale, lam=p.landmark_scale,
    )  # fmt: skip


def attention_fwd(
    p: Problem, q, k, v, r, values, key_index, mask, tiles
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile kernel's forward over all tiles.

    Args:
        q: ``[B, H, N, d]``; k, v: ``[B, Hkv, N_kv, d|dv]``; r: landmarks ``[B, H, m, d]``;
        values: ``A`` ``[B, H, m, dv]`` float32; key_index: ``[B, H, m, k]`` int64; mask: ``[B, N_kv]``
        uint8 or None; tiles: expert ``[T]``, query rows and valid flags ``[T, tile]`` (all contiguous).

    Returns:
        ``O`` [B, H, N, dv] in q's dtype and the row log-sum-exp [B, H, N] float32.
    """
    out = torch.empty(p.batch, p.heads, p.q_len, p.value_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(p.batch, p.heads, p.q_len, device=q.device, dtype=torch.float32)
    args = dict(**_attn_args(p, q, k, v, r, values, key_index, mask, tiles), O=out, LSE=lse)
    tile_rows = tiles[1]
    meta = _attn_meta(q, p, tile_rows.shape[1])
    launch(attn_fwd_kernel, (tile_rows.shape[0],), args, meta, loop_blocks=("BLOCK_M", "BLOCK_K"))
    return out, lse


def attention_bwd(
    p: Problem, q, k, v, r, values, do, lse, delta, key_index, mask, tiles, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ ``[B, H, N, d]`` (shared and routed) and the routed dK/dV ``[B, Hkv, N_kv, d|dv]``, float32.

    ``deterministic`` writes each tile's dK/dV rows to a buffer and reduces them per key in a fixed
    order (:func:`segment_sum`); otherwise they are atomically added (faster, order-dependent rounding).
    """
    b, h, hkv, n_kv, d, dv, m, topk = (
        p.batch, p.heads, p.kv_heads, p.kv_len, p.head_dim, p.value_dim, p.num_landmarks, p.topk
    )  # fmt: skip
    tile_expert, tile_rows, tile_ok = tiles
    n_tiles = tile_rows.shape[0]
    dq = torch.empty(b, h, p.q_len, d, device=q.device, dtype=torch.float32)
    per_tile = deterministic and p.routed
    if per_tile:
        dk_buf = torch.empty(n_tiles * topk, d, device=q.device, dtype=torch.float32)
        dv_buf = torch.empty(n_tiles * topk, dv, device=q.device, dtype=torch.float32)
    else:
        dk_buf = torch.zeros(b, hkv, n_kv, d, device=q.device, dtype=torch.float32)
        dv_buf = torch.zeros(b, hkv, n_kv, dv, device=q.device, dtype=torch.float32)
    args = _attn_args(p, q, k, v, r, values, key_index, mask, tiles)
    args.update(DO=do, LSE=lse, DELTA=delta, DQ=dq, DK=dk_buf, DV_=dv_buf)
    meta = dict(**_attn_meta(q, p, tile_rows.shape[1]), ATOMIC=not deterministic)
    launch(attn_bwd_kernel, (n_tiles,), args, meta, loop_blocks=("BLOCK_M", "BLOCK_K"))
    if not per_tile:
        return dq, dk_buf, dv_buf
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


def shared_bwd(
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
        splits: query chunks reduced by separate programs and summed in a fixed order
            (default: enough to fill the GPU).
    """
    b, h, n, d = q.shape
    m, dv = r.shape[2], values.shape[3]
    block_m, block_n = block(m), block(n)
    m_blocks = triton.cdiv(m, block_m)
    chunk, splits = chunking(n, splits or default_splits(b * h * m_blocks, n, q.device), block_n)
    d_a = torch.empty(b, h, m, splits, dv, device=q.device, dtype=torch.float32)
    d_r = torch.empty(b, h, m, splits, d, device=q.device, dtype=torch.float32)
    args = dict(
        Q=q, R=r, A=values, DO=do, LSE=lse, DELTA=delta, DA=d_a, DR=d_r,
        n_q=n, m=m, lam=lam, chunk=chunk, splits=splits,
    )  # fmt: skip
    meta = dict(
        D=d, DV=dv, BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), BLOCK_M=block_m, BLOCK_N=block_n,
        PREC=dot_precision(q.dtype),
    )  # fmt: skip
    launch(shared_bwd_kernel, (b * h, m_blocks, splits), args, meta, loop_blocks=("BLOCK_N",))
    return d_a.sum(3), d_r.sum(3)


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
    args = dict(SRC=src, ORDER=order, OFFSETS=offsets, OUT=out, rows=rows, width=src.shape[1])
    meta = dict(BLOCK_R=block_r, BLOCK_W=pow2(src.shape[1], 1))
    launch(segment_sum_kernel, (triton.cdiv(rows, block_r),), args, meta)
    return out


def mita_fwd(p: Problem, q, k, v, r, mask) -> tuple:
    """Forward of the whole op; returns ``(out, expert_index, key_index, saved)`` for :func:`mita_bwd`."""
    key_index, values, lse_l = landmark_fwd(r, k, v, mask, p.scale, p.topk)
    expert_index = route(q, r)
    tiles = tiling(p, expert_index)
    out, lse = attention_fwd(p, q, k, v, r, values, key_index, mask, tiles)
    return out, expert_index, key_index, (values, lse_l, tiles, lse)


def mita_bwd(p: Problem, q, k, v, r, mask, out, d_out, key_index, saved, deterministic: bool) -> tuple:
    """dQ, dK, dV, dR (float32) given dO and what :func:`mita_fwd` saved."""
    values, lse_l, tiles, lse = saved
    do = d_out.contiguous()
    delta = (do.float() * out.float()).sum(-1)  # [B, H, N]: rowsum(dO * O) of the one softmax
    dq, dk, dv = attention_bwd(p, q, k, v, r, values, do, lse, delta, key_index, mask, tiles, deterministic)
    if p.shared:
        d_values, dr = shared_bwd(q, r, values, do, lse, delta, p.landmark_scale)
        dr += landmark_bwd(r, k, v, mask, p.scale, values, lse_l, d_values, dk, dv)
    else:
        dr = torch.zeros(r.shape, device=r.device, dtype=torch.float32)
    return dq, dk, dv, dr


# --------------------------------------------------------------------------------- autograd, public


class MitaFunction(torch.autograd.Function):
    """Autograd of the Triton op: saves q, k, v, R, the mask, A and its LSE, the key indices, the
    tiling, O and the row LSE; nothing of size ``N x m``."""

    @staticmethod
    def forward(ctx, q, k, v, r, mask, p: Problem, deterministic: bool):  # noqa: D102
        out, expert_index, key_index, (values, lse_l, tiles, lse) = mita_fwd(p, q, k, v, r, mask)
        ctx.save_for_backward(q, k, v, r, mask, values, lse_l, key_index, *tiles, out, lse)
        ctx.p, ctx.deterministic = p, deterministic
        ctx.mark_non_differentiable(expert_index, key_index)
        return out, expert_index, key_index

    @staticmethod
    def backward(ctx, d_out, _d_expert, _d_keys):  # noqa: D102
        q, k, v, r, mask, values, lse_l, key_index, *tiles, out, lse = ctx.saved_tensors
        saved = (values, lse_l, tuple(tiles), lse)
        dq, dk, dv, dr = mita_bwd(ctx.p, q, k, v, r, mask, out, d_out, key_index, saved, ctx.deterministic)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dr.to(r.dtype), None, None, None


def parallel_mita(
    p: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, Routing]:
    """MiTA (s = 1) through the Triton kernels, differentiable in q, k, v and landmarks.

    Args:
        p: the validated problem (``experts_per_query == 1``).
        q: ``[B, H, N, d]``; k, v: ``[B, Hkv, N_kv, d]`` / ``[B, Hkv, N_kv, dv]``; landmarks ``[B, H, m, d]``,
            all float32, float16 or bfloat16 on one device (CUDA, or CPU under the interpreter).
        key_padding_mask: ``[B, N_kv]`` bool, True = padding, or None.

    Returns:
        ``O`` ``[B, H, N, dv]`` in q's dtype and the :class:`Routing`. dK/dV of the routed keys are summed
        deterministically when ``torch.are_deterministic_algorithms_enabled()``, else with atomics.
    """
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    deterministic = torch.are_deterministic_algorithms_enabled()
    out, expert_index, key_index = MitaFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), landmarks.contiguous(), mask, p, deterministic
    )
    return out, Routing(expert_index, key_index)
