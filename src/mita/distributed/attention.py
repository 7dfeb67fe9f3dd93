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

from ..ops.common import float32_if_half, query_side
from ..ops.torch_backend import _dedup_mask
from .collectives import all_gather
from .common import routed_part, selected_rows, shard_problem, shard_sequence, shared_values, validated

__all__ = ["context_parallel_attention", "shard_sequence"]


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
) -> torch.Tensor:
    """MiTA (SPEC §2) on a sequence sharded across the ranks of ``group``; see the module docstring. Its
    causal sibling is :func:`mita.distributed.context_parallel_causal_attention`.

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
    p = validated(
        lambda world: shard_problem(
            q, k, v, landmarks, world, topk=topk, experts_per_query=experts_per_query, scale=scale,
            landmark_scale=landmark_scale, shared=shared, routed=routed, dedup=dedup,
            key_padding_mask=key_padding_mask,
        ),
        key_padding_mask,
        group,
    )  # fmt: skip
    b, h, _, d = q.shape
    hkv, m = p.kv_heads, p.num_landmarks
    shared, routed = p.shared, p.routed

    out_dtype = q.dtype
    q, k, v, landmarks = float32_if_half(q, k, v, landmarks)
    every = all_gather(landmarks, group, "landmarks")  # [P, B, H, m / P, d]
    r = every.permute(1, 2, 0, 3, 4).reshape(b, h, m, d)
    scores = (r.reshape(b, hkv, p.group * m, d) @ k.transpose(-1, -2)) * p.scale  # [B, Hkv, g*m, n]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    qr, expert_index = query_side(p, q, r)
    lses, outs = [], []
    if shared:
        values = shared_values(p, scores, v, group)
        shared_logits = qr * p.landmark_scale
        lses.append(torch.logsumexp(shared_logits, dim=-1, keepdim=True))
        outs.append((torch.softmax(shared_logits, dim=-1) @ values).unsqueeze(-2))
    if routed:
        masked = key_padding_mask is not None
        key_index, ktab, vtab, pad = selected_rows(p, scores, k, v, masked, group)
        dup = _dedup_mask(p, key_index, expert_index) if p.dedup and p.experts_per_query > 1 else None
        lse_r, out_r = routed_part(p, q, ktab, vtab, pad, dup, expert_index, tile)
        lses.append(lse_r)
        outs.append(out_r)
    if len(outs) == 1 and outs[0].shape[-2] == 1:
        out = outs[0].squeeze(-2)
    else:
        weights = torch.softmax(torch.cat(lses, dim=-1), dim=-1)
        out = (weights.unsqueeze(-1) * torch.cat(outs, dim=-2)).sum(-2)
    return out.to(out_dtype)
