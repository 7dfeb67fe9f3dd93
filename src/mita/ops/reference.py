"""Dense reference backend: SPEC §2 written out literally; the definition all else is tested against.

For every query it gathers the concatenated key lists of its experts, builds the one softmax over
``[m landmark logits] ++ [s*k routed logits]`` and mixes ``[A] ++ [V_t]``. Memory is
O(N * s * k * d), fine for tests; use the ``torch`` backend for real work.
"""

from __future__ import annotations

import torch

from .common import Problem, Routing, float32_if_half, landmark_side, query_side, without_padding


def _per_query_keys(p: Problem, key_index: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Key indices each query attends to through its experts: [B, H, N, s*k], experts in rank order."""
    b, h, n, s = expert_index.shape
    rows = expert_index.reshape(b, h, n * s, 1).expand(-1, -1, -1, p.topk)
    return key_index.gather(2, rows).reshape(b, h, n, s * p.topk)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor, group: int) -> torch.Tensor:
    """x [B, Hkv, N, e] gathered at idx [B, H, L, J] -> [B, H, L, J, e] (head h reads kv head h // group)."""
    xh = x.repeat_interleave(group, dim=1)
    b, h, length, j = idx.shape
    flat = idx.reshape(b, h, length * j, 1).expand(-1, -1, -1, x.shape[-1])
    return xh.gather(2, flat).reshape(b, h, length, j, x.shape[-1])


def _duplicates(idx: torch.Tensor) -> torch.Tensor:
    """True where a key index already occurred earlier in the same query's list."""
    same = idx.unsqueeze(-1) == idx.unsqueeze(-2)  # [..., J, J]
    j = idx.shape[-1]
    earlier = torch.ones(j, j, dtype=torch.bool, device=idx.device).tril(-1)
    return (same & earlier).any(-1)


def reference_forward(
    p: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, Routing]:
    out_dtype = q.dtype
    q, k, v, landmarks = float32_if_half(q, k, v, landmarks)  # as the torch backend
    k, v = without_padding(k, v, key_padding_mask)
    key_index, values = landmark_side(p, k, v, landmarks, key_padding_mask)
    qr, expert_index = query_side(p, q, landmarks)
    logits, mixed = [], []
    if p.shared:
        logits.append(qr * p.landmark_scale)
        mixed.append(values)
    if p.routed:
        idx = _per_query_keys(p, key_index, expert_index)  # [B, H, N, s*k]
        keys = _gather_tokens(k, idx, p.group)
        routed = torch.einsum("bhnd,bhnjd->bhnj", q, keys) * p.scale
        drop = torch.zeros_like(idx, dtype=torch.bool)
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :].expand(-1, p.heads, p.q_len, -1)
            drop |= pad.gather(3, idx)
        if p.dedup:
            drop |= _duplicates(idx)
        logits.append(routed.masked_fill(drop, float("-inf")))
        mixed.append(_gather_tokens(v, idx, p.group))
    weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    out = 0
    if p.shared:
        out = weights[..., : p.num_landmarks] @ values
    if p.routed:
        w = weights[..., p.num_landmarks :] if p.shared else weights
        out = out + torch.einsum("bhnj,bhnje->bhne", w, mixed[-1])
    return out.to(out_dtype), Routing(expert_index, key_index)
