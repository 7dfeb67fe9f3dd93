"""Dense reference of causal MiTA: SPEC §5 written out literally, the definition the fast path is
tested against (float64-capable).

Every (query block ``beta``, landmark ``j``) pair gets its own masked score row over all ``N`` keys
(``prefix``: ``t < beta * b``; ``frozen``: ``t < (j + 1) * b``; only ``j < beta`` is usable); top-k and
the shared-value softmax run on the masked rows (``-inf`` before selection, unfilled slots dropped
after). Each query then takes ONE softmax over its landmark logits, its experts' keys and its own block
(``beta * b <= t <= i``), written as a dense ``N x N`` own-block mask. Memory is
O(ceil(N/b) * n_l * N + N^2): for tests only.
"""

from __future__ import annotations

import torch

from .common import CausalProblem, CausalRouting, route, router_gate_shift, router_log_probs


def visible_mask(p: CausalProblem, device: torch.device) -> torch.Tensor:
    """Key t is in the horizon of landmark j: ``"prefix"`` [ceil(N/b), n_l, N] per serving query block
    beta (``t < beta * b``, and only ``j < beta`` serves); ``"frozen"`` [n_l, N] (``t < (j + 1) * b``)."""
    nq, nl, b = p.num_query_blocks, p.num_landmarks, p.block_size
    j = torch.arange(nl, device=device).view(nl, 1)
    t = torch.arange(p.seq_len, device=device).view(1, -1)
    if p.horizon == "frozen":
        return t < (j + 1) * b
    beta = torch.arange(nq, device=device).view(nq, 1, 1)
    return (t < beta * b) & (j < beta)


def causal_reference_forward(
    p: CausalProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor
) -> tuple[torch.Tensor, CausalRouting]:
    n, b, nl, s, g = p.seq_len, p.block_size, p.num_landmarks, p.experts_per_query, p.group
    dev = q.device
    kx, vx = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    pos = torch.arange(n, device=dev)
    qblock = pos // b
    logits, values = [], []  # values[i]: [B, H, N, L_i, dv]

    # Own block: beta(i) * b <= t <= i, dense N x N.
    own = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= (qblock * b)[:, None])
    logits.append((q @ kx.transpose(-1, -2) * p.scale).masked_fill(~own, float("-inf")))
    values.append(vx[:, :, None].expand(-1, -1, n, -1, -1))

    expert_index = q.new_full((p.batch, p.heads, n, s), -1, dtype=torch.long)
    kk = min(p.topk, max(1, nl * b))
    key_shape = (p.batch, p.heads) + ((p.num_query_blocks, nl) if p.horizon == "prefix" else (nl,)) + (kk,)
    key_index = torch.full(key_shape, -1, dtype=torch.long, device=dev)
    if nl > 0:
        vis = visible_mask(p, dev)  # prefix [nq, n_l, N]; frozen [n_l, N]
        scores = landmarks @ kx.transpose(-1, -2) * p.scale  # [B, H, n_l, N]
        if p.horizon == "prefix":
            scores = scores[:, :, None]  # [B, H, nq, n_l, N]
        scores = scores.masked_fill(~vis, float("-inf"))
        qr, expert_index = route(p, q, landmarks)
        if p.shared:
            # Rows with no visible key (j >= beta) are never used; give them finite logits (no NaN).
            safe = scores.masked_fill(~vis.any(-1, keepdim=True), 0.0)
            vv = vx[:, :, None] if p.horizon == "prefix" else vx
            a = torch.softmax(safe, dim=-1) @ vv  # prefix [B, H, nq, n_l, dv]; frozen [B, H, n_l, dv]
            a = a[:, :, qblock] if p.horizon == "prefix" else a[:, :, None].expand(-1, -1, n, -1, -1)
            allowed = torch.arange(nl, device=dev)[None, :] < qblock[:, None]
            logits.append((qr * p.landmark_scale).masked_fill(~allowed, float("-inf")))
            values.append(a)  # [B, H, N, n_l, dv]
        # Key sets (mask before selection), part of the routing even with routed=False.
        top = scores.detach().topk(kk, dim=-1)
        filled = top.values > float("-inf")  # unfilled slots are dropped after selection
        key_index = torch.where(filled, top.indices, -1)
        if p.horizon == "prefix":
            per_query = key_index[:, :, qblock]  # [B, H, N, n_l, kk]
        else:
            per_query = key_index[:, :, None].expand(-1, -1, n, -1, -1)
        if p.routed and p.grouped:  # every visible landmark's set, logits + log pi_i(j) (frozen)
            valid = (per_query >= 0) & torch.isfinite(router_log_probs(p, qr))[..., None]  # [B,H,N,n_l,kk]
            idx = per_query.clamp_min(0).reshape(p.batch, p.heads, n, nl * kk, 1)
            keys = kx[:, :, None].expand(-1, -1, n, -1, -1).gather(3, idx.expand(-1, -1, -1, -1, p.head_dim))
            vals = vx[:, :, None].expand(-1, -1, n, -1, -1).gather(3, idx.expand(-1, -1, -1, -1, p.value_dim))
            routed = torch.einsum("bhnd,bhnjd->bhnj", q, keys) * p.scale
            routed = routed + router_log_probs(p, qr).repeat_interleave(kk, dim=-1)
            logits.append(routed.masked_fill(~valid.reshape(routed.shape), float("-inf")))
            values.append(vals)
        elif p.routed:
            e = expert_index.clamp_min(0)[..., None].expand(-1, -1, -1, -1, kk)
            idx = per_query.gather(3, e)  # [B, H, N, s, kk]
            valid = (idx >= 0) & (expert_index >= 0)[..., None]
            idx = torch.where(valid, idx, 0).reshape(p.batch, p.heads, n, s * kk)
            keys = kx.gather(2, idx.reshape(p.batch, p.heads, -1, 1).expand(-1, -1, -1, p.head_dim))
            vals = vx.gather(2, idx.reshape(p.batch, p.heads, -1, 1).expand(-1, -1, -1, p.value_dim))
            keys = keys.reshape(p.batch, p.heads, n, s * kk, p.head_dim)
            vals = vals.reshape(p.batch, p.heads, n, s * kk, p.value_dim)
            routed = torch.einsum("bhnd,bhnjd->bhnj", q, keys) * p.scale
            if p.router_gate:  # + (l - sg(l)) on every routed logit of expert r: 0 forward, gradient to qr
                routed = routed + router_gate_shift(p, qr, expert_index).repeat_interleave(kk, dim=-1)
            logits.append(routed.masked_fill(~valid.reshape(routed.shape), float("-inf")))
            values.append(vals)
    weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    out, start = 0, 0
    for vals in values:
        w = weights[..., start : start + vals.shape[3]]
        out = out + torch.einsum("bhnj,bhnje->bhne", w, vals)
        start += vals.shape[3]
    return out, CausalRouting(expert_index, key_index, p.horizon, b)
