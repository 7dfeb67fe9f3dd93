"""Routing recall of causal MiTA on associative recall: how often a query's expert holds the key it needs.

In MQAR (:mod:`mita.data.mqar`) a query at position ``p`` repeats a key first seen at context position
``t``. The value it must produce sits at ``t + 1``, and an induction head reads it there: in the layer
that retrieves, the key vector at ``t + 1`` carries "my previous token was the key". The *needed
position* of the query is therefore ``t + 1``. The query is *recalled* by a head when that position is
in the key set of the head's routed expert (``expert_index[..., p, 0]`` and its ``key_index`` row, as
:class:`mita.ops.causal.common.CausalRouting` returns them). A needed position inside the query's own
block is always visible and is counted apart (``own_block``).
"""

from __future__ import annotations

from typing import Any

import torch

from mita.nn.causal import MiTACausal

__all__ = ["mqar_routing_summary", "needed_positions", "routing_recall"]


def needed_positions(x: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, ...]:
    """``(batch, query, needed)``: long ``[Q]`` each, one entry per answer position (``y != ignore_index``).

    ``needed`` is one past the first earlier position holding the same token as the query
    (``-1`` if there is none).
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must be [B, N] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    bi, qi = (y != ignore_index).nonzero(as_tuple=True)
    n = x.shape[1]
    same = x[bi] == x[bi, qi].unsqueeze(1)  # [Q, N]: where the query's token occurs
    same &= torch.arange(n, device=x.device)[None, :] < qi[:, None]  # only before the query
    first = torch.where(same.any(1), same.float().argmax(1), torch.full_like(qi, -2))
    return bi, qi, first + 1


def routing_recall(
    routing: Any, batch: torch.Tensor, query: torch.Tensor, needed: torch.Tensor
) -> dict[str, float | int]:
    """Recall of the needed positions by the routed experts (one layer's routing).

    Args:
        routing: a ``CausalRouting`` (``expert_index`` [B, H, N, s], ``key_index`` [B, H, nq, n_l, k] for
            ``"prefix"`` or [B, H, n_l, k] for ``"frozen"``, ``horizon``, ``block_size``).
        batch, query, needed: from :func:`needed_positions`.

    Returns ``queries`` (counted), ``own_block`` (fraction whose needed position is in their own block),
    and over the other queries: ``recall_any_head`` (some head's expert holds it), ``recall_mean_head``
    (the average over heads), ``routable`` (fraction with at least one landmark to route to), and the
    split of the recall: ``coverage_*`` (some visible landmark's set holds it: the recall of an oracle
    router that picks the best visible landmark), ``routing_given_coverage_*`` (recall among the covered
    queries) and ``chance_*`` (the expected recall of a router drawing one visible landmark uniformly at
    random, per head; ``any_head``: at least one of the heads' independent draws hits).
    Experts beyond the first (``s > 1``) count too: a hit in any of a head's experts is a hit.
    """
    ei, ki, b = routing.expert_index, routing.key_index, int(routing.block_size)
    if routing.horizon not in ("prefix", "frozen"):
        raise ValueError(f"unknown landmark horizon {routing.horizon!r}")
    if not (batch.shape == query.shape == needed.shape):
        raise ValueError("batch, query and needed must have one shape")
    ok = needed >= 0
    batch, query, needed = batch[ok], query[ok], needed[ok]
    own = (needed // b) == (query // b)
    far = ~own
    bq, qq, nq = batch[far], query[far], needed[far]
    experts = ei[bq, :, qq]  # [Q, H, s]
    if routing.horizon == "prefix":
        blocks = (qq // b)[:, None, None].expand_as(experts)
        heads = torch.arange(ei.shape[1], device=ei.device)[None, :, None].expand_as(experts)
        sets = ki[bq[:, None, None], heads, blocks, experts.clamp_min(0)]  # [Q, H, s, k]
    else:
        heads = torch.arange(ei.shape[1], device=ei.device)[None, :, None].expand_as(experts)
        sets = ki[bq[:, None, None], heads, experts.clamp_min(0)]  # [Q, H, s, k]
    hit = ((sets == nq[:, None, None, None]).any(-1) & (experts >= 0)).any(-1)  # [Q, H]
    cover, visible = _coverage(routing, bq, qq, nq)  # [Q, H, n_l] which visible sets hold it; [Q, 1, n_l]
    n_vis = visible.sum(-1).clamp_min(1)
    covered = cover.any(-1)  # [Q, H]: the oracle router (the best visible landmark) recalls it
    chance = cover.sum(-1) / n_vis  # [Q, H]: a landmark drawn uniformly among the visible ones holds it
    total = int(ok.sum())
    n_far = int(far.sum())

    def mean(x: torch.Tensor) -> float:
        return float(x.float().mean()) if n_far else float("nan")

    any_cov = covered.any(1)
    return {
        "queries": total,
        "own_block": float(own.float().mean()) if total else float("nan"),
        "recall_any_head": mean(hit.any(1)),
        "recall_mean_head": mean(hit),
        "routable": mean((experts >= 0).any(-1).any(-1)),
        "coverage_any_head": mean(any_cov),
        "coverage_mean_head": mean(covered),
        "routing_given_coverage_any_head": float(hit.any(1)[any_cov].float().mean())
        if any_cov.any()
        else float("nan"),
        "routing_given_coverage_mean_head": float(hit[covered].float().mean())
        if covered.any()
        else float("nan"),
        "chance_any_head": mean(1 - (1 - chance).prod(1)),
        "chance_mean_head": mean(chance),
    }


def _coverage(
    routing: Any, batch: torch.Tensor, query: torch.Tensor, needed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which landmarks' key sets, as the query sees them, hold its needed position: bool [Q, H, n_l]
    (visible landmarks ``j < beta(query)`` only), and the visibility mask [Q, 1, n_l]."""
    ki, b = routing.key_index, int(routing.block_size)
    if routing.horizon == "prefix":  # [B, H, nq, n_l, k]: the sets as the query's block sees them
        sets = ki[batch, :, query // b]  # [Q, H, n_l, k]
    else:  # [B, H, n_l, k]
        sets = ki[batch]
    nl = sets.shape[2]
    visible = (torch.arange(nl, device=ki.device)[None, :] < (query // b)[:, None])[:, None]  # [Q, 1, n_l]
    return (sets == needed[:, None, None, None]).any(-1) & visible, visible


@torch.no_grad()
def mqar_routing_summary(model: torch.nn.Module, dataset: Any, n_examples: int = 64) -> list[dict[str, Any]]:
    """Per causal-MiTA layer of ``model``, :func:`routing_recall` on the first ``n_examples`` of the MQAR
    ``dataset`` (``(x, y)`` items), with its coverage / routing split and the chance line; ``[]`` when the
    model has no causal MiTA mixer. The model is left in the mode it was in."""
    mixers = [m for m in model.modules() if isinstance(m, MiTACausal)]
    if not mixers or len(dataset) == 0:
        return []
    device = next(model.parameters()).device
    xs, ys = zip(*(dataset[i] for i in range(min(n_examples, len(dataset)))))
    x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
    was_training = model.training
    for m in mixers:
        m.record_routing = True
    try:
        model.eval()(x)
        bi, qi, need = needed_positions(x, y)
        return [{"layer": i, **routing_recall(m.last_routing, bi, qi, need)} for i, m in enumerate(mixers)]
    finally:
        for m in mixers:
            m.record_routing, m.last_routing = False, None
        model.train(was_training)
