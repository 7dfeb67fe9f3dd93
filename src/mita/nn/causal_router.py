"""Training aids for causal MiTA's router: routing distillation from dense attention, and the identity
that attaches an auxiliary loss to a tensor.

Routing distillation (DeepSeek Sparse Attention's indexer loss, in the factorised form that targets
routing recall): for a sample of queries ``i`` outside block 0, the teacher is the dense softmax of
``q_i . k_t`` over the keys before the query's block (``t < beta(i) b``), detached; its mass inside each
visible landmark's routed key set, normalised over the visible landmarks, is the target of the router
``pi_i = softmax_{j < beta(i)} (lambda q_i . r_j)`` under ``KL(target || pi_i)``. It is a training-only
loss: the forward output, causality and decoding are unaffected.
"""

from __future__ import annotations

import torch

from ..ops.causal import CausalRouting

__all__ = ["attach_loss", "landmark_mass", "router_kl", "routing_distillation_loss"]


class _AttachLoss(torch.autograd.Function):
    """``out`` unchanged; in the backward, each loss term ``losses[b, h, s]`` receives gradient 1 when
    the output row it belongs to, ``out[b, h, rows[b, s]]``, receives any gradient (0 otherwise)."""

    @staticmethod
    def forward(ctx, out, losses, rows):  # noqa: D102 - autograd plumbing
        ctx.save_for_backward(rows)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):  # noqa: D102 - autograd plumbing
        (rows,) = ctx.saved_tensors
        # The sampled rows' gradients only (S of N rows): whether each takes part in the objective.
        g_rows = g.gather(2, rows[:, None, :, None].expand(-1, g.shape[1], -1, g.shape[-1]))
        g_losses = (g_rows != 0).any(-1).to(g.dtype)
        return g, g_losses, None


def attach_loss(out: torch.Tensor, losses: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out`` [B, H, N, dv], bit for bit, with the loss terms ``losses`` [B, H, S] of the query rows
    ``rows`` [B, S] added to whatever objective ``out`` feeds: a term's gradient reaches its inputs in
    the same backward pass when its row's output gets a gradient (Megatron's DSA attaches its indexer
    loss through an identity too), so no training loop has to know about it. A term computed from
    positions ``<= rows[b, s]`` only keeps the Jacobian of every output row free of later positions."""
    return _AttachLoss.apply(out, losses, rows)


def routing_distillation_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    landmarks: torch.Tensor,
    routing: CausalRouting,
    *,
    scale: float,
    landmark_scale: float,
    queries: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(teacher mass per landmark || router)`` of ``queries`` random queries per sequence.

    Args:
        q, k: ``[B, H, N, d]`` (``k`` already repeated to ``H`` heads).
        landmarks: ``[B, H, n_l, d]``, the routing vectors ``r_j``.
        routing: the op's :class:`~mita.ops.causal.CausalRouting` of this forward (the key sets).
        scale, landmark_scale: ``c`` of the key logits, ``lambda`` of the landmark logits.
        queries: queries sampled per sequence (uniformly among those with a landmark to route to).

    Returns ``(terms [B, H, S], rows [B, S])``: each sampled query's KL and its position (its mean is the
    loss). The terms carry gradient to ``q`` and ``landmarks`` only through the router logits, and the
    term of row ``i`` depends on positions ``<= i`` only. ``S = 0`` when no query has a landmark
    (``N <= b``).
    """
    b = routing.block_size
    bsz, h, n, d = q.shape
    nl = landmarks.shape[2]
    if nl == 0 or n <= b:
        return q.new_zeros(bsz, h, 0), torch.zeros(bsz, 0, dtype=torch.long, device=q.device)
    pos = b + torch.randint(n - b, (bsz, queries), device=q.device, generator=generator)  # [B, S]
    beta = pos // b
    qs = q.gather(2, pos[:, None, :, None].expand(-1, h, -1, d))  # [B, H, S, d]
    with torch.no_grad():
        logits = (qs * scale) @ k.transpose(-1, -2)  # [B, H, S, N]; scaled before: S d, not S N products
        before = torch.arange(n, device=q.device)[None, :] < (beta * b)[:, :, None]  # [B, S, N]
        teacher = torch.softmax(torch.where(before[:, None], logits, float("-inf")), dim=-1)
        ki = routing.key_index
        if routing.horizon == "prefix":  # [B, H, nq, n_l, kk]: the sets as the query's block sees them
            ki = ki.gather(2, beta[:, None, :, None, None].expand(-1, h, -1, nl, ki.shape[-1]))
            mass = teacher.gather(-1, ki.clamp_min(0).flatten(-2)).view(ki.shape)
            mass = torch.where(ki >= 0, mass, 0.0).sum(-1)  # [B, H, S, n_l]
        else:  # [B, H, n_l, kk], one set per landmark for every query
            mass = landmark_mass(teacher, ki)  # [B, H, S, n_l]
        visible = torch.arange(nl, device=q.device)[None, None, :] < beta[:, :, None]  # [B, S, n_l]
    return router_kl(qs, landmarks, mass, landmark_scale=landmark_scale, visible=visible), pos


def landmark_mass(teacher: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """The mass ``[B, H, S, n_l]`` of the rows of ``teacher`` ``[B, H, S, N]`` inside each landmark's key
    set ``key_index`` ``[B, H, n_l, kk]`` (-1 = an unfilled slot), one set per landmark for every row: a
    product with the sets' 0/1 membership ``[N, n_l]`` (a set holds a key once), not an S-fold gather."""
    bsz, h, _, n = teacher.shape
    member = teacher.new_zeros(bsz, h, n + 1, key_index.shape[2])  # row n: the unfilled slots (-1)
    slots = torch.where(key_index >= 0, key_index, n).transpose(-1, -2)  # [B, H, kk, n_l]
    member.scatter_(2, slots, 1.0)
    return teacher @ member[:, :, :n]


def router_kl(
    qs: torch.Tensor,
    landmarks: torch.Tensor,
    mass: torch.Tensor,
    *,
    landmark_scale: float,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(target || pi)`` per query ``[B, H, S]``: ``target`` is the teacher's ``mass`` ``[B, H, S, n_l]``
    per landmark normalised over the landmarks (detached), ``pi = softmax_j(landmark_scale qs . r_j)`` of
    the queries ``qs`` ``[B, H, S, d]`` and ``landmarks`` ``[B, H, n_l, d]`` (gradient flows through these
    logits only). ``visible`` ``[B, S, n_l]`` bool (None: all) restricts both to the landmarks a query
    may route to."""
    with torch.no_grad():
        if visible is not None:
            mass = torch.where(visible[:, None], mass, 0.0)
        target = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    router = (qs @ landmarks.transpose(-1, -2)) * landmark_scale  # [B, H, S, n_l], with gradient
    if visible is not None:
        router = router.masked_fill(~visible[:, None], float("-inf"))
    # logits - logsumexp, not log_softmax: torch's CPU (log-)softmax over a short last dimension is slow.
    logp = router - torch.logsumexp(router, dim=-1, keepdim=True)
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp), 0.0)
    return terms.sum(-1)
