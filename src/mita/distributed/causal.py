"""Causal MiTA with the frozen landmark horizon (SPEC §5) on a sequence sharded across ranks.

Landmark ``j`` is the mean of query block ``j`` and sees the keys ``t < (j + 1) b``; query ``i`` in block
``beta`` attends, in one softmax, to landmarks ``j < beta``, to the keys of its best such landmarks and
causally to its own block. With each rank holding whole blocks (``n`` a multiple of ``b``), the pieces are
those of the non-causal op with the horizon as a mask: ranks beyond a landmark's horizon contribute
neutral partials (max ``-inf``, sums 0) and no candidates, and the own block is local. The landmarks are
one per block, ``m = N / b``, so the bytes grow with N (by ``m``), unlike the non-causal op's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.causal.common import merge_parts, partial_softmax
from ..ops.common import Problem
from .attention import _routed_part, _selected_rows, _shared_values
from .collectives import all_gather, group_rank

__all__ = ["causal_context_parallel"]


def _route(qr: torch.Tensor, s: int, b: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts of the local queries (global positions from ``offset``) among landmarks ``j < beta``:
    ``(expert_index [B, H, n, s] with -1 where none, allowed [n, m])``, as the single-process op."""
    n, m = qr.shape[-2], qr.shape[-1]
    beta = (torch.arange(n, device=qr.device) + offset) // b
    allowed = torch.arange(m, device=qr.device)[None, :] < beta[:, None]
    scores = qr.detach().masked_fill(~allowed, float("-inf"))
    se = min(s, m)
    idx = scores.argmax(-1, keepdim=True) if se == 1 else scores.topk(se, dim=-1).indices
    if se < s:
        idx = torch.cat([idx, idx.new_zeros(*idx.shape[:-1], s - se)], dim=-1)
    valid = torch.arange(s, device=qr.device)[None, :] < beta[:, None]
    return torch.where(valid, idx, -1), allowed


def _own_block(p: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int):
    """Causal attention within each query's own block (local: blocks never straddle ranks)."""
    bb, h, n, d = q.shape
    kx, vx = k.repeat_interleave(p.group, dim=1), v.repeat_interleave(p.group, dim=1)
    qb = q.reshape(bb, h, n // b, b, d)
    kb = kx.reshape(bb, h, n // b, b, d)
    vb = vx.reshape(bb, h, n // b, b, p.value_dim)
    logits = (qb @ kb.transpose(-1, -2)) * p.scale
    causal = torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
    lse, out = partial_softmax(logits.masked_fill(~causal, float("-inf")), vb)
    return lse.reshape(bb, h, n, 1), out.reshape(bb, h, n, p.value_dim)


def causal_context_parallel(
    p: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    block_size: int,
    group: dist.ProcessGroup | None,
    tile: int | None,
) -> torch.Tensor:
    """The frozen-horizon causal op on this rank's whole blocks; ``p`` is the non-causal problem of the
    shapes (``num_landmarks`` = N / b, ``topk`` already clipped to N)."""
    bsz, h, n, d = q.shape
    hkv, m, b = p.kv_heads, p.num_landmarks, block_size
    offset = group_rank(group) * n
    every = all_gather(landmarks, group, "landmarks")  # [P, B, H, n / b, d]
    r = every.permute(1, 2, 0, 3, 4).reshape(bsz, h, m, d)
    scores = (r.reshape(bsz, hkv, p.group * m, d) @ k.transpose(-1, -2)) * p.scale  # [B, Hkv, g*m, n]
    t = torch.arange(n, device=q.device) + offset
    j = torch.arange(m, device=q.device).repeat(p.group)  # landmark of each of the g*m rows
    scores = scores.masked_fill(t[None, :] >= (j[:, None] + 1) * b, float("-inf"))  # the frozen horizon
    qr = q @ r.transpose(-1, -2)  # [B, H, n, m]
    expert_index, allowed = _route(qr, p.experts_per_query, b, offset)
    parts = [_own_block(p, q, k, v, b)]
    if p.shared:
        values = _shared_values(p, scores, v, group)  # every landmark sees its own block: no empty row
        parts.append(partial_softmax((qr * p.landmark_scale).masked_fill(~allowed, float("-inf")), values))
    if p.routed:
        _, ktab, vtab, unfilled = _selected_rows(p, scores, k, v, True, group)
        no_expert = (expert_index < 0)[..., None].expand(-1, -1, -1, -1, p.topk)
        lse_r, out_r = _routed_part(p, q, ktab, vtab, unfilled, no_expert, expert_index.clamp_min(0), tile)
        w = torch.softmax(lse_r, dim=-1)  # the s experts' parts merged into one
        parts.append((torch.logsumexp(lse_r, dim=-1, keepdim=True), (w.unsqueeze(-1) * out_r).sum(-2)))
    return merge_parts(parts)
