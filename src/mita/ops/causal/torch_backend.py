"""Fast pure-PyTorch causal MiTA (SPEC §5): block-major, never N x N.

Per query block ``beta`` (``b`` queries) the output is one softmax over three disjoint key sets, each
computed as a partial softmax (normalised output + log-sum-exp) and merged exactly:

- own block: batched block-diagonal attention ``[nq, b, b]`` with a causal mask;
- shared expert: logits ``lambda q . r_j`` for ``j < beta`` with values ``A_j``. ``"frozen"``: ``A_j``
  over keys ``t < (j + 1) b``, one tensor ``[n_l, dv]``, as one masked attention of the landmarks
  (SDPA's fused kernel). ``"prefix"``: ``A_j^(beta)`` over keys ``t < beta b``, built by a scan over key
  blocks of per-(landmark, key block) online-softmax states (max, sum, numerator), so each key block is
  folded in once, not recomputed per query block;
- routed experts: each query's ``s`` experts (argmax / top-s of ``q . r_j`` over ``j < beta``, masked
  before selection) and their top-k key sets. ``"prefix"``: a running top-k merged block by block
  (``-inf`` before selection, unfilled slots masked after); each query attends to its own gathered
  keys through a chunked gathered attention with its own backward. ``"frozen"``: one masked top-k per
  landmark; (query, expert) pairs are packed expert-major into tiles sharing one key set.

Memory per head (n_l = N / b landmarks): the landmark scores ``R K^T``, ``n_l * N`` (N^2 / b; kept for
autograd only by ``"prefix"``, with their exponentials), the query-landmark products ``N * n_l`` and the
routed key indices ``N * s * k``. ``"prefix"`` adds the per-(landmark, key block) states and the
per-(query block, landmark) values ``A``, ``2 * n_l^2 * dv`` (N^2 dv / b^2) plus the scan's saved
intermediates, and ~8 MB chunks for the gathered keys; ``"frozen"`` adds a boolean ``n_l * N`` mask,
``n_l * dv`` for ``A`` and the tiles' keys/values (about ``2 N s k (d + dv) / T`` for tiles of ``T``
pairs). No ``.item()`` or data-dependent shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import ExpertTiles, default_tile_size, float32_if_half
from .common import (
    CausalProblem,
    CausalRouting,
    merge_parts,
    partial_softmax,
    route,
    router_gate_shift,
    router_log_probs,
)


def _own_block(p: CausalProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Causal attention inside each block: (lse [B, H, N, 1], out [B, H, N, dv])."""
    bsz, h, n, d = q.shape
    b, nq, g, hkv = p.block_size, p.num_query_blocks, p.group, p.kv_heads
    pad = nq * b - n
    qb = F.pad(q, (0, 0, 0, pad)).view(bsz, hkv, g, nq, b, d)
    kb = F.pad(k, (0, 0, 0, pad)).view(bsz, hkv, 1, nq, b, d)
    vb = F.pad(v, (0, 0, 0, pad)).view(bsz, hkv, 1, nq, b, p.value_dim)
    logits = (qb @ kb.transpose(-1, -2)) * p.scale  # [B, Hkv, g, nq, b, b]
    future = torch.ones(b, b, dtype=torch.bool, device=q.device).triu(1)
    lse, out = partial_softmax(logits.masked_fill(future, float("-inf")), vb)
    return lse.reshape(bsz, h, nq * b, 1)[:, :, :n], out.reshape(bsz, h, nq * b, -1)[:, :, :n]


def _block_states(p: CausalProblem, scores: torch.Tensor, v: torch.Tensor):
    """Per (key block c, landmark) online-softmax pieces of the shared values.

    ``scores`` [B, Hkv, g*n_l, n_l*b]. Returns max, sum [B, Hkv, C, g*n_l] and numerator
    [B, Hkv, C, g*n_l, dv] with ``C = n_l`` key blocks; the max carries no gradient (it cancels).
    """
    bsz, hkv, gj, _ = scores.shape
    nl, b = p.num_landmarks, p.block_size
    s = scores.view(bsz, hkv, gj, nl, b)
    mx = s.detach().amax(-1)  # [B, Hkv, gJ, C]
    e = torch.exp(s - mx[..., None])
    total = e.sum(-1).transpose(2, 3)  # [B, Hkv, C, gJ]
    num = e.transpose(2, 3) @ v[:, :, : nl * b].reshape(bsz, hkv, nl, b, p.value_dim)  # [B, Hkv, C, gJ, dv]
    return mx.transpose(2, 3), total, num


def _prefix_values(p: CausalProblem, mx, total, num) -> torch.Tensor:
    """``A_j^(beta)`` over keys ``t < beta b`` for every query block: [B, Hkv, nq, g*n_l, dv].

    A scan over key blocks: the state after block ``c`` is exactly that of the keys before block
    ``c + 1``, rescaled to the running max (so nothing depends on later blocks, bit for bit)."""
    # unbind once: indexing a slice per step would make autograd add a full-size zero tensor per step.
    mxs, totals, nums = mx.unbind(2), total.unbind(2), num.unbind(2)
    run_max = torch.full_like(mxs[0], float("-inf"))
    run_sum = torch.zeros_like(totals[0])
    run_num = torch.zeros_like(nums[0])
    values = [run_num]  # block 0 uses no landmark
    for beta in range(1, p.num_query_blocks):
        c = beta - 1
        new_max = torch.maximum(run_max, mxs[c])
        keep, add = torch.exp(run_max - new_max), torch.exp(mxs[c] - new_max)
        run_sum = run_sum * keep + totals[c] * add
        run_num = run_num * keep[..., None] + nums[c] * add[..., None]
        run_max = new_max
        values.append(run_num / run_sum[..., None])
    return torch.stack(values, dim=2)


def _frozen_values(p: CausalProblem, mx, total, num) -> torch.Tensor:
    """``A_j`` over keys ``t < (j + 1) b``: [B, Hkv, g*n_l, dv]."""
    nl = p.num_landmarks
    c = torch.arange(nl, device=mx.device)
    j = torch.arange(mx.shape[-1], device=mx.device) % nl
    mine = c[:, None] <= j[None, :]  # [C, gJ]: key block c is in landmark j's horizon
    top = mx.masked_fill(~mine, float("-inf")).amax(2, keepdim=True)
    coef = torch.where(mine, torch.exp(mx - top), 0.0)  # no gradient: mx is detached
    return (coef[..., None] * num).sum(2) / (coef * total).sum(2)[..., None]


def _prefix_sets(p: CausalProblem, scores: torch.Tensor, expert_index: torch.Tensor, kk: int, history: bool):
    """Running top-k over key blocks; returns each query's expert sets [B, H, N, s, kk] (-1 = none)
    and, if ``history``, every (query block, landmark) set [B, H, nq, n_l, kk]."""
    bsz, h, n, s = expert_index.shape
    nl, b = p.num_landmarks, p.block_size
    sc = scores.view(bsz, h, nl, nl, b)
    val = sc.new_full((bsz, h, nl, kk), float("-inf"))
    idx = torch.zeros(bsz, h, nl, kk, dtype=torch.long, device=scores.device)
    offs = torch.arange(b, device=scores.device)
    per_query = [torch.full((bsz, h, min(b, n), s, kk), -1, dtype=torch.long, device=scores.device)]
    hist = [torch.full_like(idx, -1)]
    for beta in range(1, p.num_query_blocks):
        c = beta - 1
        cand_val = torch.cat([val, sc[:, :, :, c]], dim=-1)  # mask-before-top-k: only keys < beta b
        cand_idx = torch.cat([idx, (c * b + offs).expand(bsz, h, nl, b)], dim=-1)
        top = cand_val.topk(kk, dim=-1, sorted=False)
        val, idx = top.values, cand_idx.gather(-1, top.indices)
        sets = torch.where(val > float("-inf"), idx, -1)
        if history:
            usable = torch.arange(nl, device=scores.device)[:, None] < beta
            hist.append(torch.where(usable, sets, -1))
        e = expert_index[:, :, beta * b : (beta + 1) * b]  # [B, H, bb, s]
        rows = e.clamp_min(0).reshape(bsz, h, -1, 1).expand(-1, -1, -1, kk)
        got = sets.gather(2, rows).reshape(bsz, h, e.shape[2], s, kk)
        per_query.append(torch.where((e >= 0)[..., None], got, -1))
    return torch.cat(per_query, dim=2), (torch.stack(hist, dim=2) if history else None)


# Rows per chunk of the per-query gather: ~8 MB temporaries, reused between chunks (big temporaries
# cost page faults on every call on CPU, more than the gather itself).
_CHUNK_BYTES = 8 * 2**20


class _GatheredAttention(torch.autograd.Function):
    """Each row ``r`` attends to its own keys ``rows[r]`` (flat rows of k/v; ``valid`` masks empty slots):
    returns the partial softmax ``(lse [R], out [R, dv])``. Computed in chunks of rows, saving only the
    indices: the backward gathers again (as flash attention recomputes), so no ``[R, L, d]`` tensor is kept.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows, valid, scale):  # noqa: D102 - autograd plumbing
        r_total, d = q.shape
        width, dv = rows.shape[1], v.shape[1]
        chunk = max(1, _CHUNK_BYTES // max(1, width * (d + dv) * q.element_size()))
        lse, out = q.new_empty(r_total), q.new_empty(r_total, dv)
        for lo in range(0, r_total, chunk):
            hi = min(r_total, lo + chunk)
            idx = rows[lo:hi].reshape(-1)
            kg = k.index_select(0, idx).view(hi - lo, width, d)
            vg = v.index_select(0, idx).view(hi - lo, width, dv)
            logits = torch.bmm(q[lo:hi, None], kg.transpose(1, 2)) * scale
            lse_c, out_c = partial_softmax(logits.masked_fill(~valid[lo:hi, None], float("-inf")), vg)
            lse[lo:hi], out[lo:hi] = lse_c.view(-1), out_c.view(hi - lo, dv)
        ctx.save_for_backward(q, k, v, rows, valid, lse, out)
        ctx.scale, ctx.chunk = scale, chunk
        return lse, out

    @staticmethod
    def backward(ctx, g_lse, g_out):  # noqa: D102 - autograd plumbing
        q, k, v, rows, valid, lse, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        r_total, d = q.shape
        width, dv = rows.shape[1], v.shape[1]
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        g_out = torch.zeros_like(out) if g_out is None else g_out
        dq, dk, dv_ = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for lo in range(0, r_total, chunk):
            hi = min(r_total, lo + chunk)
            idx = rows[lo:hi].reshape(-1)
            kg = k.index_select(0, idx).view(hi - lo, width, d)
            vg = v.index_select(0, idx).view(hi - lo, width, dv)
            qc, go = q[lo:hi], g_out[lo:hi]
            logits = torch.bmm(qc[:, None], kg.transpose(1, 2)).view(hi - lo, width) * scale
            prob = torch.exp(logits.masked_fill(~valid[lo:hi], float("-inf")) - lse[lo:hi, None])
            gv = torch.bmm(go[:, None], vg.transpose(1, 2)).view(hi - lo, width)  # g_out . v_t
            base = (go * out[lo:hi]).sum(-1, keepdim=True) - g_lse[lo:hi, None]
            dlogit = prob * (gv - base) * scale
            dq[lo:hi] = torch.bmm(dlogit[:, None], kg).view(hi - lo, d)
            dk.index_add_(0, idx, (dlogit[..., None] * qc[:, None]).view(-1, d))
            dv_.index_add_(0, idx, (prob[..., None] * go[:, None]).view(-1, dv))
        return dq, dk, dv_, None, None, None


def _routed(p: CausalProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sets: torch.Tensor):
    """Attention of every query to its experts' keys ``sets`` [B, H, N, s, kk] (-1 = empty slot)."""
    bsz, h, n, d = q.shape
    dev = q.device
    kv_row = torch.arange(bsz, device=dev)[:, None] * p.kv_heads + torch.arange(h, device=dev) // p.group
    width = sets.shape[-2] * sets.shape[-1]
    valid = (sets >= 0).view(bsz * h * n, width)
    rows = (kv_row[:, :, None, None, None] * n + sets.clamp_min(0)).view(bsz * h * n, width)
    lse, out = _GatheredAttention.apply(
        q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, p.value_dim), rows, valid, p.scale
    )
    return lse.view(bsz, h, n, 1), out.view(bsz, h, n, p.value_dim)


def _routed_tiles(
    p: CausalProblem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_index: torch.Tensor,
    expert_index: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Frozen horizon: every landmark has ONE key set ``key_index`` [B, H, n_l, kk] for all query blocks,
    so (query, expert) pairs are packed expert-major into tiles that share it (as the non-causal torch
    backend does): each tile gathers its expert's keys once. Queries without an expert (block 0, or
    fewer than s landmarks) go to an extra, fully masked expert. Returns one partial softmax per rank.

    The pairs a tile holds depend on all queries' routing, but each row's logits and softmax are
    computed on that row alone (row-wise products), so a query's output does not depend on its tile-mates.
    """
    bsz, h, n, d = q.shape
    s, nl, kk, dv = p.experts_per_query, p.num_landmarks, key_index.shape[-1], p.value_dim
    bh, dev = bsz * h, q.device
    e = expert_index.masked_fill(expert_index < 0, nl)  # expert nl: the masked one
    experts = (torch.arange(bh, device=dev).view(bsz, h, 1, 1) * (nl + 1) + e).reshape(-1)
    tiles = ExpertTiles(experts, bh * (nl + 1), default_tile_size(n * s, nl + 1))
    ki = torch.cat([key_index, key_index.new_full((bsz, h, 1, kk), -1)], dim=2).reshape(bh * (nl + 1), kk)
    kv_row = torch.arange(bsz, device=dev)[:, None] * p.kv_heads + torch.arange(h, device=dev) // p.group
    kv_row = kv_row.reshape(bh, 1).expand(bh, nl + 1).reshape(-1, 1)
    tile_ki = ki.index_select(0, tiles.expert)  # [n_tiles, kk]
    tile_keys = (kv_row.index_select(0, tiles.expert) * n + tile_ki.clamp_min(0)).reshape(-1)
    kt = k.reshape(-1, d).index_select(0, tile_keys).view(tiles.n_tiles, kk, d)
    vt = v.reshape(-1, dv).index_select(0, tile_keys).view(tiles.n_tiles, kk, dv)
    qt = q.reshape(-1, d).index_select(0, tiles.pair.reshape(-1) // s).view(tiles.n_tiles, tiles.tile, d)
    logits = (qt @ kt.transpose(1, 2)) * p.scale
    logits = logits.masked_fill((tile_ki < 0).unsqueeze(1), float("-inf"))
    lse_t, out_t = partial_softmax(logits, vt)
    slot = tiles.slot_of_pair
    out = out_t.reshape(-1, dv).index_select(0, slot).view(bsz, h, n, s, dv)
    lse = lse_t.reshape(-1).index_select(0, slot).view(bsz, h, n, s)
    return [(lse[..., r : r + 1], out[..., r, :]) for r in range(s)]


def _grouped(p: CausalProblem, q, k, v, key_index: torch.Tensor, qr: torch.Tensor):
    """``grouped=True`` (frozen): one partial softmax over EVERY visible landmark's key set, each set's
    logits shifted by ``log pi_i(j)`` (Landmark Attention's grouped softmax), so the router's
    probabilities weigh the routed keys in the forward pass and learn from the loss directly.
    The frozen sets are the same for all queries: ``[n_l * kk]`` keys per head, one matmul."""
    bsz, h, n, d = q.shape
    nl, kk = key_index.shape[2], key_index.shape[3]
    idx = key_index.clamp_min(0).reshape(bsz, h, nl * kk, 1)
    kx, vx = k.repeat_interleave(p.group, dim=1), v.repeat_interleave(p.group, dim=1)
    ks = kx.gather(2, idx.expand(-1, -1, -1, d))  # [B, H, n_l * kk, d]
    vs = vx.gather(2, idx.expand(-1, -1, -1, p.value_dim))
    logits = (q @ ks.transpose(-1, -2)) * p.scale + router_log_probs(p, qr).repeat_interleave(kk, dim=-1)
    logits = logits.masked_fill((key_index < 0).reshape(bsz, h, 1, nl * kk), float("-inf"))
    return partial_softmax(logits, vs)


def causal_torch_forward(
    p: CausalProblem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    return_routing: bool = False,
) -> tuple[torch.Tensor, CausalRouting | None]:
    out_dtype = q.dtype
    q, k, v, landmarks = float32_if_half(q, k, v, landmarks)
    bsz, h, n, d = q.shape
    nl, b, nq, s, g = p.num_landmarks, p.block_size, p.num_query_blocks, p.experts_per_query, p.group
    kk = min(p.topk, max(1, nl * b))
    parts = [_own_block(p, q, k, v)]
    expert_index = torch.full((bsz, h, n, s), -1, dtype=torch.long, device=q.device)
    key_shape = (bsz, h) + ((nq, nl) if p.horizon == "prefix" else (nl,)) + (kk,)
    key_index = None
    if nl > 0:
        qr, expert_index = route(p, q, landmarks)
        rk = landmarks.reshape(bsz, p.kv_heads, g * nl, d)
        prefix_shared = p.shared and p.horizon == "prefix"  # frozen: scores only for top-k, no gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and prefix_shared):
            scores = (rk @ k[:, :, : nl * b].transpose(-1, -2)) * p.scale  # [B, Hkv, g*n_l, n_l*b]
        horizon = (
            torch.arange(nl * b, device=q.device)[None, :]
            < (torch.arange(nl, device=q.device)[:, None] + 1) * b
        )
        if p.shared:
            allowed = (
                torch.arange(nl, device=q.device)[None, :] < (torch.arange(n, device=q.device) // b)[:, None]
            )
            logits = (qr * p.landmark_scale).masked_fill(~allowed, float("-inf"))
            if p.horizon == "prefix":
                a = _prefix_values(p, *_block_states(p, scores, v))  # [B, Hkv, nq, g*n_l, dv]
                a = a.view(bsz, p.kv_heads, nq, g, nl, -1).transpose(2, 3).reshape(bsz, h, nq, nl, -1)
                lg = F.pad(logits, (0, 0, 0, nq * b - n)).view(bsz, h, nq, b, nl)
                lse, out = partial_softmax(lg, a)
                parts.append(
                    (lse.reshape(bsz, h, nq * b, 1)[:, :, :n], out.reshape(bsz, h, nq * b, -1)[:, :, :n])
                )
            else:
                # A_j over keys t < (j + 1) b: a masked attention of the landmarks (SDPA's fused kernel).
                a = F.scaled_dot_product_attention(
                    landmarks, k[:, :, : nl * b], v[:, :, : nl * b], attn_mask=horizon, scale=p.scale,
                    enable_gqa=g > 1,
                )  # fmt: skip
                parts.append(partial_softmax(logits, a))
        if p.routed or return_routing:
            with torch.no_grad():
                sd = scores.detach().reshape(bsz, h, nl, nl * b)
                if p.horizon == "prefix":
                    sets, key_index = _prefix_sets(p, sd, expert_index, kk, return_routing)
                else:
                    top = sd.masked_fill(~horizon, float("-inf")).topk(kk, dim=-1, sorted=False)
                    key_index = torch.where(top.values > float("-inf"), top.indices, -1)  # [B, H, n_l, kk]
            if p.routed and p.horizon == "prefix" and not (p.router_gate and s > 1):
                routed = [_routed(p, q, k, v, sets)]
            elif p.routed and p.horizon == "prefix":  # the gate shifts each expert's part on its own
                routed = [_routed(p, q, k, v, sets[..., r : r + 1, :]) for r in range(s)]
            elif p.routed and p.grouped:
                routed = [_grouped(p, q, k, v, key_index, qr)]
            elif p.routed:
                routed = _routed_tiles(p, q, k, v, key_index, expert_index)
            if p.routed and p.router_gate:  # the straight-through gate: 0 added to each part's lse
                gate = router_gate_shift(p, qr, expert_index)
                routed = [(lse + gate[..., r : r + 1], o) for r, (lse, o) in enumerate(routed)]
            if p.routed:
                parts += routed
    out = merge_parts(parts).to(out_dtype)
    if not return_routing:
        return out, None
    if key_index is None:
        key_index = torch.full(key_shape, -1, dtype=torch.long, device=q.device)
    return out, CausalRouting(expert_index, key_index, p.horizon, b)
