"""What both context-parallel ops share (:mod:`.attention`, non-causal; :mod:`.causal`, causal): the group
checks, the shards' validation and cross-rank consistency check, and the pieces of the exchange (shared
values from log-sum-exp partials, the selected key/value rows, the routed part over them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..ops.arguments import as_bool, as_experts, as_int, as_scale, check_attention_tensors
from ..ops.common import ExpertTiles, Problem, default_tile_size
from .collectives import all_gather, all_reduce_sum, group_rank, group_size
from .selection import merge_candidates, topk_lowest_index

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_group(group: dist.ProcessGroup | None) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "context_parallel_attention needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    if group_rank(group) < 0:
        raise ValueError("this process is not a member of the context-parallel group it was given")


def shard_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's contiguous shard of ``x`` along ``dim``, a view (rank ``r`` of ``P`` gets the ``r``-th of
    ``P`` equal parts). Raises ValueError when the length is not divisible by ``P``."""
    require_group(group)
    p, r = group_size(group), group_rank(group)
    n = x.shape[dim]
    if n % p:
        raise ValueError(
            f"sequence length {n} is not divisible by the {p} ranks of the context-parallel group; "
            f"pad it to a multiple of {p}"
        )
    return x.narrow(dim, r * (n // p), n // p)


_META_NAMES = [
    "B", "H", "N_q", "d", "B_kv", "H_kv", "N_kv", "d_k", "dv", "m_local", "dtype", "mask", "topk",
    "experts_per_query", "shared", "routed", "dedup", "scale", "landmark_scale", "causal", "block_size",
]  # fmt: skip


def _check_consistent(
    meta: list[float] | None,
    error: ValueError | None,
    mask: torch.Tensor | None,
    group: dist.ProcessGroup | None,
) -> None:
    """Every rank must hold valid shards of one problem (equal shapes, dtypes and options): raise the same
    ValueError on every rank otherwise, so that none is left waiting in a later collective. ``meta`` are
    the rank's sizes and options (None with the ``error`` its own inputs raised)."""
    flagged = [-1.0] * len(_META_NAMES) + [1.0] if meta is None else [*meta, 0.0]
    every = all_gather(torch.tensor(flagged, dtype=torch.float64), group, "check")
    bad_ranks = every[:, -1].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if bad_ranks:
        raise ValueError(f"context-parallel inputs are invalid on rank(s) {bad_ranks} (see their error)")
    if not bool((every == every[0]).all()):
        diff = [nm for i, nm in enumerate(_META_NAMES) if not bool((every[:, i] == every[0, i]).all())]
        per_rank = {nm: every[:, _META_NAMES.index(nm)].tolist() for nm in diff}
        raise ValueError(
            "context-parallel shards differ across ranks (every rank must hold equal shards of one "
            f"sequence, with the same options): {per_rank}"
        )
    if mask is not None:
        # A batch row whose keys are padding on every rank has no key to attend to.
        full = all_gather(mask.all(dim=1).to(torch.uint8), group, "check").all(dim=0)
        if bool(full.any()):
            rows = full.nonzero().flatten().tolist()
            raise ValueError(f"key_padding_mask marks every key as padding in batch rows {rows}")


def shard_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    world: int,
    *,
    topk: int,
    experts_per_query: int,
    scale: float | None,
    landmark_scale: float | None,
    shared: bool,
    routed: bool,
    dedup: bool,
    key_padding_mask: torch.Tensor | None,
    block_size: int | None = None,
) -> tuple[Problem, list[float]]:
    """This rank's checks: the :class:`Problem` of the whole sequence and the sizes and options every rank
    must share. ``block_size``: the causal op's (already checked), None for the non-causal op."""
    check_attention_tensors(q, k, v, landmarks)
    b, h, nq, d = q.shape
    _, hkv, n_local, _ = k.shape
    m_local = landmarks.shape[2]
    n_kv, m = world * n_local, world * m_local
    causal = block_size is not None
    if causal:
        topk = min(as_int("topk", topk), n_kv)  # at most every key can be visible, as the single-process op
    topk = as_int("topk", topk, 1, n_kv, what=f"N={n_kv}")
    # causal: a query may ask for more experts than it has landmarks before it (the rest are unused)
    s = as_int("experts_per_query", experts_per_query, 1, None if causal else m, what=f"m={m}")
    (shared, routed), dedup = as_experts(shared, routed), as_bool("dedup", dedup)
    scale, landmark_scale = as_scale("scale", scale), as_scale("landmark_scale", landmark_scale)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor [B, n] (True = padding)")
        if tuple(key_padding_mask.shape) != (b, n_local):
            got = tuple(key_padding_mask.shape)
            raise ValueError(f"key_padding_mask must have shape [B, n] = [{b}, {n_local}], got {got}")
    p = Problem(
        batch=b, heads=h, kv_heads=hkv, q_len=nq, kv_len=n_kv, head_dim=d, value_dim=v.shape[3],
        num_landmarks=m, topk=topk, experts_per_query=s,
        scale=scale if scale is not None else float(d) ** -0.5,
        landmark_scale=landmark_scale if landmark_scale is not None else 1.0 / float(d),
        shared=shared, routed=routed, dedup=dedup,
    )  # fmt: skip
    meta = [*q.shape, *k.shape, v.shape[3], m_local, _DTYPES.index(q.dtype), key_padding_mask is not None]
    meta += [topk, s, shared, routed, dedup, p.scale, p.landmark_scale, causal, block_size or 0]
    return p, meta


def validated(
    validate: Callable[[int], tuple[Problem, list[float]]],
    key_padding_mask: torch.Tensor | None,
    group: dist.ProcessGroup | None,
) -> Problem:
    """``validate(world)`` on this rank, then the same verdict on every rank: a bad shard, or shards that
    differ, raise the same ValueError on every rank before any collective of the op."""
    require_group(group)
    world = group_size(group)
    try:
        p, meta = validate(world)
        error = None
    except ValueError as err:
        if world == 1:
            raise
        p, meta, error = None, None, err
    if world > 1:
        _check_consistent(meta, error, key_padding_mask, group)
    elif key_padding_mask is not None and bool(key_padding_mask.all(dim=1).any()):
        rows = key_padding_mask.all(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"key_padding_mask marks every key as padding in batch rows {rows}")
    return p


def shared_values(
    p: Problem, scores: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """``A = softmax(R K^T c) V`` over all ranks' keys, from merged per-rank log-sum-exp partials."""
    mx = scores.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    e = torch.exp(scores - mx)  # a rank whose keys are all padding gives e = 0, z = 0, u = 0
    parts = torch.cat([mx, e.sum(-1, keepdim=True), e @ v], dim=-1)  # [B, Hkv, g*m, dv + 2]
    every = all_gather(parts, group, "shared_partials")  # [P, B, Hkv, g*m, dv + 2]
    mx_all = every[..., :1].detach()
    w = torch.exp(mx_all - mx_all.amax(0, keepdim=True))
    z = (w * every[..., 1:2]).sum(0)
    u = (w * every[..., 2:]).sum(0)
    return (u / z).reshape(p.batch, p.heads, p.num_landmarks, p.value_dim)


def selected_rows(
    p: Problem,
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masked: bool,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each landmark's top-k keys over all ranks and their rows.

    Returns ``key_index`` [B, H, m, k] (global), the selected keys [B, H, m, k, d] and values
    [B, H, m, k, dv], and ``pad`` [B, H, m, k] (True where a selected key is padding) or None."""
    b, hkv, gm, n_local = scores.shape
    d, dv, kk = p.head_dim, p.value_dim, p.topk
    rank = group_rank(group)
    cand_v, cand_i = topk_lowest_index(scores.detach(), min(kk, n_local))
    cand_i = cand_i + rank * n_local
    every_v = all_gather(cand_v, group, "candidates")  # [P, B, Hkv, g*m, k_local]
    every_i = all_gather(cand_i, group, "candidates")
    flat = (b, hkv, gm, -1)
    every_v = every_v.permute(1, 2, 3, 0, 4).reshape(flat)
    every_i = every_i.permute(1, 2, 3, 0, 4).reshape(flat)
    sel_v, key_index = merge_candidates(every_v, every_i, kk)  # [B, Hkv, g*m, k], same on every rank
    # Owners contribute their rows, zeros elsewhere; the sum over ranks is every selected row, exactly.
    local = key_index - rank * n_local
    mine = (local >= 0) & (local < n_local)
    rows = local.clamp(0, n_local - 1).reshape(b, hkv, gm * kk, 1)
    kv = torch.cat([k, v], dim=-1)
    table = kv.gather(2, rows.expand(-1, -1, -1, d + dv)).reshape(b, hkv, gm, kk, d + dv)
    table = torch.where(mine.unsqueeze(-1), table, torch.zeros((), dtype=table.dtype))
    table = all_reduce_sum(table, group, "rows")
    shape = (p.batch, p.heads, p.num_landmarks, kk)
    ktab = table[..., :d].reshape(*shape, d)
    vtab = table[..., d:].reshape(*shape, dv)
    pad = (sel_v == float("-inf")).reshape(shape) if masked else None
    return key_index.reshape(shape), ktab, vtab, pad


def routed_part(
    p: Problem,
    q: torch.Tensor,
    ktab: torch.Tensor,
    vtab: torch.Tensor,
    pad: torch.Tensor | None,
    dup: torch.Tensor | None,
    expert_index: torch.Tensor,
    tile: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed experts over the selected rows, expert-major as the torch backend: log-sum-exp
    [B, H, n, s] and normalised output [B, H, n, s, dv]."""
    b, h, n, d = q.shape
    s, m, kk, dv = p.experts_per_query, p.num_landmarks, p.topk, p.value_dim
    bh = b * h
    experts = (torch.arange(bh, device=q.device).reshape(b, h, 1, 1) * m + expert_index).reshape(-1)
    tiles = ExpertTiles(experts, bh * m, tile or default_tile_size(n * s, m))
    kt = ktab.reshape(bh * m, kk, d).index_select(0, tiles.expert)
    vt = vtab.reshape(bh * m, kk, dv).index_select(0, tiles.expert)
    qt = q.reshape(-1, d).index_select(0, tiles.pair.reshape(-1) // s).reshape(tiles.n_tiles, tiles.tile, d)
    logits = torch.bmm(qt, kt.transpose(1, 2)) * p.scale  # [n_tiles, T, k]
    drop = None
    if pad is not None:
        drop = pad.reshape(bh * m, kk).index_select(0, tiles.expert).unsqueeze(1)
    if dup is not None:
        dup = dup.reshape(-1, kk).index_select(0, tiles.pair.reshape(-1))
        dup = dup.reshape(tiles.n_tiles, tiles.tile, kk)
        drop = dup if drop is None else (drop | dup)
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    mx = logits.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    e = torch.exp(logits - mx)
    z = e.sum(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
    out_t = torch.bmm(e, vt) / z
    lse_t = (mx + torch.log(z)).squeeze(-1)
    slot = tiles.slot_of_pair
    out = out_t.reshape(-1, dv).index_select(0, slot).reshape(b, h, n, s, dv)
    lse = lse_t.reshape(-1).index_select(0, slot).reshape(b, h, n, s)
    return lse, out
