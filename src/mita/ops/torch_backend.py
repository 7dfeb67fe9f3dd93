"""Fast pure-PyTorch backend (CPU and GPU fallback), expert-major.

The routed part is computed tile by tile: every (query, expert) pair is sorted by expert and packed
into fixed-size tiles of ``T`` pairs that share one expert, so each tile is one small dense attention
``[T, d] x [k, d]^T`` over its expert's keys (gathered once per tile, never per query). The number of
tiles has a static upper bound, so nothing here syncs with the host or has a data-dependent shape.
Each tile returns a normalised partial output and its log-sum-exp; these are merged with the shared
expert (computed in query order from the routing logits it shares) by one log-sum-exp combine, which
equals the single softmax of SPEC §2.4. Memory: O(N (m + s k) d) plus the m x N landmark scores.
"""

from __future__ import annotations

import torch

from .common import (
    ExpertTiles,
    Problem,
    Routing,
    default_tile_size,
    float32_if_half,
    landmark_side,
    query_side,
    without_padding,
)


def _dedup_mask(p: Problem, key_index: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """[B, H, N, s, k]: True where the key was already offered by one of the query's earlier experts."""
    b, h, n, s = expert_index.shape
    m, n_kv = p.num_landmarks, p.kv_len
    member = torch.zeros(b, h, m, n_kv, dtype=torch.bool, device=key_index.device)
    member.scatter_(3, key_index, True)
    # pair[e', e, j] = key j of expert e is also selected by expert e'.
    pair = member.gather(3, key_index.reshape(b, h, 1, m * p.topk).expand(-1, -1, m, -1))
    pair = pair.reshape(b, h, m, m, p.topk)
    dup = torch.zeros(b, h, n, s, p.topk, dtype=torch.bool, device=key_index.device)
    for r in range(1, s):
        cur = expert_index[..., r]  # [B, H, N]
        for r0 in range(r):
            prev = expert_index[..., r0]
            flat = (prev * m + cur).reshape(b, h, n, 1).expand(-1, -1, -1, p.topk)
            dup[..., r, :] |= pair.reshape(b, h, m * m, p.topk).gather(2, flat)
    return dup


def _routed_part(
    p: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_index: torch.Tensor,
    expert_index: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    tile: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed experts, expert-major: log-sum-exp [B, H, N, s] and normalised output [B, H, N, s, dv]."""
    b, h, n, d = q.shape
    s, m, kk, dv = p.experts_per_query, p.num_landmarks, p.topk, p.value_dim
    bh = b * h
    dev = q.device
    experts = (torch.arange(bh, device=dev).reshape(b, h, 1, 1) * m + expert_index).reshape(-1)
    tiles = ExpertTiles(experts, bh * m, tile or default_tile_size(n * s, m))

    # Global row of every selected key in the flattened [B * Hkv * N_kv] key/value tables.
    kv_row = torch.arange(b, device=dev).reshape(b, 1) * p.kv_heads + torch.arange(h, device=dev) // p.group
    key_rows = (kv_row.reshape(b, h, 1, 1) * p.kv_len + key_index).reshape(bh * m, kk)
    tile_keys = key_rows.index_select(0, tiles.expert).reshape(-1)  # [n_tiles * k]
    queries = tiles.pair.reshape(-1) // s  # pair = ((b*H + h)*N + n)*s + r
    drop = None
    if key_padding_mask is not None:
        pad_rows = (torch.arange(b, device=dev).reshape(b, 1, 1, 1) * p.kv_len + key_index).reshape(
            bh * m, kk
        )
        drop = key_padding_mask.reshape(-1)[pad_rows.index_select(0, tiles.expert)].unsqueeze(1)
    if p.dedup and s > 1:
        dup = _dedup_mask(p, key_index, expert_index).reshape(-1, kk)
        dup = dup.index_select(0, tiles.pair.reshape(-1)).reshape(tiles.n_tiles, tiles.tile, kk)
        drop = dup if drop is None else (drop | dup)
    kt = k.reshape(-1, d).index_select(0, tile_keys).reshape(tiles.n_tiles, kk, d)
    vt = v.reshape(-1, dv).index_select(0, tile_keys).reshape(tiles.n_tiles, kk, dv)
    qt = q.reshape(-1, d).index_select(0, queries).reshape(tiles.n_tiles, tiles.tile, d)
    logits = torch.bmm(qt, kt.transpose(1, 2)) * p.scale  # [n_tiles, T, k]
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    # Per-tile softmax pieces; the clamps keep fully masked rows finite (weight 0) with no NaN gradients.
    row_max = logits.detach().amax(-1, keepdim=True)
    mx = row_max.clamp_min(torch.finfo(logits.dtype).min)
    e = torch.exp(logits - mx)
    z = e.sum(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
    out_t = torch.bmm(e, vt) / z
    # A row whose logits are all -inf because of its data (an infinite input), not its mask, has no
    # softmax in the definition: lse -inf, so the merged output is NaN as the reference's.
    dead = row_max == float("-inf")
    if drop is not None:
        dead = dead & ~drop.all(-1, keepdim=True)
    lse_t = (mx + torch.log(z)).masked_fill(dead, float("-inf")).squeeze(-1)
    slot = tiles.slot_of_pair
    out = out_t.reshape(-1, dv).index_select(0, slot).reshape(b, h, n, s, dv)
    lse = lse_t.reshape(-1).index_select(0, slot).reshape(b, h, n, s)
    return lse, out


def torch_forward(
    p: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    tile: int | None = None,
) -> tuple[torch.Tensor, Routing]:
    out_dtype = q.dtype
    q, k, v, landmarks = float32_if_half(q, k, v, landmarks)
    k, v = without_padding(k, v, key_padding_mask)
    key_index, values = landmark_side(p, k, v, landmarks, key_padding_mask)
    qr, expert_index = query_side(p, q, landmarks)
    lses, outs = [], []
    if p.shared:
        shared_logits = qr * p.landmark_scale
        lses.append(torch.logsumexp(shared_logits, dim=-1, keepdim=True))
        outs.append((torch.softmax(shared_logits, dim=-1) @ values).unsqueeze(-2))
    if p.routed:
        lse_r, out_r = _routed_part(p, q, k, v, key_index, expert_index, key_padding_mask, tile)
        lses.append(lse_r)
        outs.append(out_r)
    if len(outs) == 1 and outs[0].shape[-2] == 1:
        out = outs[0].squeeze(-2)
        if not p.shared:  # the routed part alone: a row without a finite logit is NaN (see above)
            out = out.masked_fill(lses[0] == float("-inf"), float("nan"))
    else:
        weights = torch.softmax(torch.cat(lses, dim=-1), dim=-1)  # [B, H, N, parts]
        out = (weights.unsqueeze(-1) * torch.cat(outs, dim=-2)).sum(-2)
    return out.to(out_dtype), Routing(expert_index, key_index)
