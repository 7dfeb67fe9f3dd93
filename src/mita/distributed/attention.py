"""``context_parallel_attention``: MiTA over a sequence sharded across the ranks of a process group.

Every rank holds a contiguous shard of the tokens, in rank order, and its own landmarks. The result is the
rank's rows of :func:`mita.mita_attention` on the concatenated inputs, forward and backward, while the
ranks exchange only tensors whose size does not depend on the sequence length N:

1. all-gather the landmarks (``m d`` per head);
2. shared expert: per landmark, each rank's log-sum-exp partials over its own keys (max, sum of weights,
   weighted sum of values) are all-gathered and merged with differentiable ops (``m (dv + 2)`` per head);
3. routed experts: each rank's top-k candidates per landmark (score, global key index) are all-gathered
   and merged by one deterministic rule (score descending, then index ascending), so every rank selects
   the same keys (``m k`` scores and indices per head);
4. the selected key/value rows (``m k (d + dv)`` per head) are summed over ranks, each owner contributing
   its rows and zeros elsewhere (an all-reduce: exact, and fixed-size, so nothing waits on data-dependent
   sizes);
5. routing and the single softmax of SPEC §2.4 are local.

The backward is autograd through the collectives (:mod:`.collectives`): reduce-scatters of the landmark
and partial gradients and an all-reduce of the row gradients, which each owner adds into its keys and
values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.arguments import as_bool, as_experts, as_int, as_scale, check_attention_tensors
from ..ops.common import ExpertTiles, Problem, default_tile_size, query_side
from ..ops.torch_backend import _dedup_mask
from .collectives import all_gather, all_reduce_sum, group_rank, group_size
from .selection import merge_candidates, topk_lowest_index

__all__ = ["context_parallel_attention", "shard_sequence"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require_group(group: dist.ProcessGroup | None) -> None:
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
    _require_group(group)
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


def _check_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    landmarks: torch.Tensor,
    block_size: int,
    horizon: str,
    dedup: bool,
    mask: torch.Tensor | None,
) -> int:
    """The causal options the context-parallel op supports; returns the block size."""
    b = as_int("block_size", block_size)
    if horizon != "frozen":
        raise ValueError(
            f"context parallelism supports landmark_horizon='frozen' only, got {horizon!r} (the prefix "
            "horizon needs each query block's prefix of the other ranks' partials)"
        )
    if as_bool("dedup", dedup) or mask is not None:
        raise ValueError("causal=True supports neither dedup nor key_padding_mask")
    n = q.shape[2]
    if k.shape[2] != n or n % b:
        raise ValueError(
            f"causal=True needs every rank to hold whole blocks of queries and their keys: local q {n} and "
            f"k {k.shape[2]} tokens must be equal and a multiple of block_size={b}"
        )
    if landmarks.shape[2] != n // b:
        raise ValueError(
            f"causal=True needs n // block_size = {n // b} local landmarks, got {landmarks.shape[2]}"
        )
    return b


def _shared_values(
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


def _selected_rows(
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


def _routed_part(
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


def _validate(
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
    causal: bool,
    block_size: int,
    landmark_horizon: str,
) -> tuple[Problem, int, list[float]]:
    """This rank's checks: the :class:`Problem` of the whole sequence, the block size and the sizes and
    options every rank must share."""
    check_attention_tensors(q, k, v, landmarks)
    b, h, nq, d = q.shape
    _, hkv, n_local, _ = k.shape
    m_local = landmarks.shape[2]
    n_kv, m = world * n_local, world * m_local
    if as_bool("causal", causal):
        block_size = _check_causal(q, k, landmarks, block_size, landmark_horizon, dedup, key_padding_mask)
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
    meta += [topk, s, shared, routed, dedup, p.scale, p.landmark_scale, causal, causal and block_size]
    return p, block_size, meta


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    group: dist.ProcessGroup | None = None,
    experts_per_query: int = 1,
    scale: float | None = None,
    landmark_scale: float | None = None,
    shared: bool = True,
    routed: bool = True,
    dedup: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    tile: int | None = None,
    causal: bool = False,
    block_size: int = 64,
    landmark_horizon: str = "frozen",
) -> torch.Tensor:
    """MiTA (SPEC §2) on a sequence sharded across the ranks of ``group``; see the module docstring.

    Every rank of ``group`` (default: the world) passes its contiguous shard, in rank order:

    Args:
        q: this rank's queries ``[B, H, n_q, d]``.
        k, v: this rank's keys and values ``[B, Hkv, n, d]`` / ``[B, Hkv, n, dv]`` (GQA as
            :func:`mita.mita_attention`); the full key sequence has ``N = P n`` tokens.
        landmarks: this rank's landmarks ``[B, H, m / P, d]`` (e.g. :func:`mita.landmarks.pool_1d` of the
            local queries); concatenated in rank order they are the ``m`` landmarks of the op.
        topk: keys per routed expert, ``1 <= topk <= N`` (may exceed ``n``).
        experts_per_query, scale, landmark_scale, shared, routed, dedup: as :func:`mita.mita_attention`.
        key_padding_mask: this rank's ``[B, n]`` bool, True = padding.
        tile: query-expert pairs per tile of the routed part (default: as the torch backend).
        causal, block_size, landmark_horizon: causal MiTA as ``mita_attention(..., causal=True)``, with
            the ``"frozen"`` horizon only (``"prefix"`` raises ValueError); every rank holds whole blocks
            (``n`` a multiple of ``block_size``) and its blocks' landmarks (``n // block_size`` rows, e.g.
            :func:`mita.landmarks.block_mean` of the local queries). No ``key_padding_mask``, no ``dedup``.

    Returns:
        ``[B, H, n_q, dv]``: exactly this rank's rows of ``mita_attention(cat(q), cat(k), cat(v),
        cat(landmarks), ...)``, with gradients flowing into every rank's ``q``, ``k``, ``v`` and
        ``landmarks`` (the objective being the sum of the ranks' losses). Top-k ties go to the lower global
        key index (as the CPU kernel); ``torch.topk``'s choice among ties is unspecified. bf16 / fp16
        inputs are computed, and exchanged, in float32 (as the single-process op computes them).

    Raises:
        ValueError: on bad local inputs (as :func:`mita.mita_attention`), when the shards differ across
        ranks in shape, dtype or options (raised on every rank), or when no process group is initialised.
    """
    _require_group(group)
    world = group_size(group)
    try:
        p, block_size, meta = _validate(
            q, k, v, landmarks, world, topk=topk, experts_per_query=experts_per_query, scale=scale,
            landmark_scale=landmark_scale, shared=shared, routed=routed, dedup=dedup,
            key_padding_mask=key_padding_mask, causal=causal, block_size=block_size,
            landmark_horizon=landmark_horizon,
        )  # fmt: skip
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
    b, h, _, d = q.shape
    hkv, m = p.kv_heads, p.num_landmarks
    causal, shared, routed = bool(causal), p.shared, p.routed

    out_dtype = q.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        q, k, v, landmarks = (t.float() for t in (q, k, v, landmarks))
    if causal:
        from .causal import causal_context_parallel

        return causal_context_parallel(p, q, k, v, landmarks, block_size, group, tile).to(out_dtype)
    every = all_gather(landmarks, group, "landmarks")  # [P, B, H, m / P, d]
    r = every.permute(1, 2, 0, 3, 4).reshape(b, h, m, d)
    scores = (r.reshape(b, hkv, p.group * m, d) @ k.transpose(-1, -2)) * p.scale  # [B, Hkv, g*m, n]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    qr, expert_index = query_side(p, q, r)
    lses, outs = [], []
    if shared:
        values = _shared_values(p, scores, v, group)
        shared_logits = qr * p.landmark_scale
        lses.append(torch.logsumexp(shared_logits, dim=-1, keepdim=True))
        outs.append((torch.softmax(shared_logits, dim=-1) @ values).unsqueeze(-2))
    if routed:
        masked = key_padding_mask is not None
        key_index, ktab, vtab, pad = _selected_rows(p, scores, k, v, masked, group)
        dup = _dedup_mask(p, key_index, expert_index) if p.dedup and p.experts_per_query > 1 else None
        lse_r, out_r = _routed_part(p, q, ktab, vtab, pad, dup, expert_index, tile)
        lses.append(lse_r)
        outs.append(out_r)
    if len(outs) == 1 and outs[0].shape[-2] == 1:
        out = outs[0].squeeze(-2)
    else:
        weights = torch.softmax(torch.cat(lses, dim=-1), dim=-1)
        out = (weights.unsqueeze(-1) * torch.cat(outs, dim=-2)).sum(-2)
    return out.to(out_dtype)
