"""``context_parallel_causal_attention``: causal MiTA with the frozen landmark horizon (SPEC §5) on a
sequence sharded across ranks, the sibling of :mod:`.attention` as :func:`mita.mita_causal_attention` is
of :func:`mita.mita_attention`.

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

from ..ops.arguments import as_bool, as_horizon, as_int, check_attention_tensors
from ..ops.causal.common import merge_parts, partial_softmax
from ..ops.common import Problem
from .collectives import all_gather, group_rank
from .common import routed_part, selected_rows, shard_problem, shared_values, validated

__all__ = ["context_parallel_causal_attention"]


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
    if as_horizon(horizon) != "frozen":
        raise ValueError(
            f"context parallelism supports landmark_horizon='frozen' only, got {horizon!r} (the prefix "
            "horizon needs each query block's prefix of the other ranks' partials)"
        )
    if as_bool("dedup", dedup) or mask is not None:
        raise ValueError("causal context parallelism supports neither dedup nor key_padding_mask")
    n = q.shape[2]
    if k.shape[2] != n or n % b:
        raise ValueError(
            "causal context parallelism needs every rank to hold whole blocks of queries and their keys: "
            f"local q {n} and k {k.shape[2]} tokens must be equal and a multiple of block_size={b}"
        )
    if landmarks.shape[2] != n // b:
        raise ValueError(
            f"causal context parallelism needs n // block_size = {n // b} local landmarks, "
            f"got {landmarks.shape[2]}"
        )
    return b


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


def _causal_context_parallel(
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
        values = shared_values(p, scores, v, group)  # every landmark sees its own block: no empty row
        parts.append(partial_softmax((qr * p.landmark_scale).masked_fill(~allowed, float("-inf")), values))
    if p.routed:
        _, ktab, vtab, unfilled = selected_rows(p, scores, k, v, True, group)
        no_expert = (expert_index < 0)[..., None].expand(-1, -1, -1, -1, p.topk)
        lse_r, out_r = routed_part(p, q, ktab, vtab, unfilled, no_expert, expert_index.clamp_min(0), tile)
        w = torch.softmax(lse_r, dim=-1)  # the s experts' parts merged into one
        parts.append((torch.logsumexp(lse_r, dim=-1, keepdim=True), (w.unsqueeze(-1) * out_r).sum(-2)))
    return merge_parts(parts)


def context_parallel_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    block_size: int,
    landmark_horizon: str,
    group: dist.ProcessGroup | None = None,
    experts_per_query: int = 1,
    scale: float | None = None,
    landmark_scale: float | None = None,
    shared: bool = True,
    routed: bool = True,
    tile: int | None = None,
    dedup: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal MiTA (SPEC §5) on a sequence sharded across the ranks of ``group``; see the module docstring.

    Every rank of ``group`` (default: the world) passes its contiguous shard, in rank order, of whole
    blocks:

    Args:
        q: this rank's queries ``[B, H, n, d]``, ``n`` a multiple of ``block_size``.
        k, v: this rank's keys and values ``[B, Hkv, n, d]`` / ``[B, Hkv, n, dv]`` (GQA as
            :func:`mita.mita_causal_attention`); the full sequence has ``N = P n`` tokens.
        landmarks: this rank's blocks' landmarks ``[B, H, n // block_size, d]`` (e.g.
            :func:`mita.landmarks.block_mean` of the local queries); concatenated in rank order they are
            the ``N // block_size`` landmarks of the op.
        topk, block_size, experts_per_query, scale, landmark_scale, shared, routed: as
            :func:`mita.mita_causal_attention`.
        landmark_horizon: ``"frozen"`` only (``"prefix"`` raises ValueError: it would need each query
            block's prefix of the other ranks' partials).
        tile: query-expert pairs per tile of the routed part (default: as the torch backend).
        dedup, key_padding_mask: not supported (ValueError), as in the single-process op.

    Returns:
        ``[B, H, n, dv]``: exactly this rank's rows of ``mita_causal_attention(cat(q), cat(k), cat(v),
        cat(landmarks), ...)``, with gradients flowing into every rank's ``q``, ``k``, ``v`` and
        ``landmarks`` (the objective being the sum of the ranks' losses). bf16 / fp16 inputs are
        computed, and exchanged, in float32.

    Raises:
        ValueError: on bad local inputs, when the shards differ across ranks in shape, dtype or options
        (raised on every rank), or when no process group is initialised.
    """

    def validate(world: int) -> tuple[Problem, list[float]]:
        check_attention_tensors(q, k, v, landmarks)
        b = _check_causal(q, k, landmarks, block_size, landmark_horizon, dedup, key_padding_mask)
        return shard_problem(
            q, k, v, landmarks, world, topk=topk, experts_per_query=experts_per_query, scale=scale,
            landmark_scale=landmark_scale, shared=shared, routed=routed, dedup=dedup,
            key_padding_mask=key_padding_mask, block_size=b,
        )  # fmt: skip

    p = validated(validate, key_padding_mask, group)
    out_dtype = q.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        q, k, v, landmarks = (t.float() for t in (q, k, v, landmarks))
    b = as_int("block_size", block_size)  # checked by validate
    out = _causal_context_parallel(p, q, k, v, landmarks, b, group, tile)
    return out.to(out_dtype)
