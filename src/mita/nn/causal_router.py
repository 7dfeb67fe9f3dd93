"""Training aids for causal MiTA's router: routing distillation from dense attention, and the identity
that attaches an auxiliary loss to a tensor. The same pieces (:func:`sample_rows`, :func:`dense_teacher`,
:func:`landmark_mass`, :func:`distillation_kl`) train MoBA's block gate (:func:`block_distillation_loss`)
and the non-causal module's router (:mod:`mita.nn.router`).

Routing distillation (DeepSeek Sparse Attention's indexer loss, in the factorised form that targets
routing recall): for a sample of queries ``i`` outside block 0, the teacher is the dense softmax of
``q_i . k_t`` over the keys before the query's block (``t < beta(i) b``), detached; its mass inside each
visible landmark's routed key set, normalised over the visible landmarks, is the target of the router
``pi_i = softmax_{j < beta(i)} (lambda q_i . r_j)`` under ``KL(target || pi_i)``. It is a training-only
loss: the forward output, causality and decoding are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..ops.causal import CausalRouting

__all__ = [
    "attach_loss",
    "block_distillation_loss",
    "dense_teacher",
    "distillation_kl",
    "landmark_mass",
    "objective_rows",
    "routing_distillation_loss",
    "sample_rows",
    "selection_cross_entropy",
    "weighted_cross_entropy",
]


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


def sample_rows(
    bsz: int,
    n: int,
    block_size: int,
    queries: int,
    device: torch.device,
    generator: torch.Generator | None,
    read: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, S]`` query positions ``block_size <= i < n`` (the queries with an earlier block to route to),
    ``queries`` per sequence: uniformly, or, given ``read`` ``[B, n]`` (bool: the rows whose output the
    training objective reads), uniformly among the read rows, with replacement (a sequence without any
    read row there: uniformly)."""
    if read is None:
        return block_size + torch.randint(n - block_size, (bsz, queries), device=device, generator=generator)
    if read.shape != (bsz, n):
        raise ValueError(f"objective rows must be [B, N] = {[bsz, n]}, got {list(read.shape)}")
    w = read[:, block_size:].to(torch.float32)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, 1.0)  # no host sync: a row of zeros falls back
    return block_size + torch.multinomial(w, queries, replacement=True, generator=generator)


@contextmanager
def objective_rows(model: nn.Module, read: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the routing distillation of every causal mixer in ``model`` draws its queries
    among the rows ``read`` ``[B, N]`` (bool) marks, the positions whose output the training objective
    reads (for token targets, ``targets != ignore_index``); ``None``: among all rows.

    Where only a few positions carry a loss (MQAR: the 32 queries of 512 tokens), uniform sampling spends
    most of the distillation on rows whose routing nothing depends on.
    """
    if read is None:  # the mixers' default: nothing to set, no walk over the modules on every step
        yield
        return
    mixers = [m for m in model.modules() if hasattr(m, "objective_rows")]
    for m in mixers:
        m.objective_rows = read
    try:
        yield
    finally:
        for m in mixers:
            m.objective_rows = None


def dense_teacher(
    qs: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """The detached dense softmax ``[B, H, S, N]`` of the sampled queries ``qs`` ``[B, H, S, d]`` (at
    positions ``rows`` ``[B, S]``) over the keys before each query's block, ``t < beta(i) b``."""
    n = k.shape[2]
    with torch.no_grad():
        logits = (qs * scale) @ k.transpose(-1, -2)  # [B, H, S, N]; scaled before: S d, not S N products
        before = torch.arange(n, device=k.device)[None, :] < ((rows // block_size) * block_size)[:, :, None]
        return torch.softmax(torch.where(before[:, None], logits, float("-inf")), dim=-1)


def landmark_mass(teacher: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """The mass ``[B, H, S, n_l]`` of the rows of ``teacher`` ``[B, H, S, N]`` inside each landmark's key
    set ``key_index`` ``[B, H, n_l, kk]`` (-1 = an unfilled slot), one set per landmark for every row: a
    product with the sets' 0/1 membership ``[N, n_l]`` (a set holds a key once), not an S-fold gather."""
    bsz, h, _, n = teacher.shape
    member = teacher.new_zeros(bsz, h, n + 1, key_index.shape[2])  # row n: the unfilled slots (-1)
    slots = torch.where(key_index >= 0, key_index, n).transpose(-1, -2)  # [B, H, kk, n_l]
    member.scatter_(2, slots, 1.0)
    return teacher @ member[:, :, :n]


def distillation_kl(
    mass: torch.Tensor, router: torch.Tensor, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(target || softmax(router))`` per query, ``[B, H, S]``: ``mass`` ``[B, H, S, J]`` (detached,
    the teacher's mass per routing choice) normalised over the ``visible`` ``[B, S, J]`` choices (None:
    all) into the target; ``router`` ``[B, H, S, J]`` the router logits (with gradient), invisible
    choices masked."""
    with torch.no_grad():
        if visible is not None:
            mass = torch.where(visible[:, None], mass, 0.0)
        target = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    if visible is not None:
        router = router.masked_fill(~visible[:, None], float("-inf"))
    # logits - logsumexp, not log_softmax: torch's CPU (log-)softmax over a short last dimension is slow.
    logp = router - torch.logsumexp(router, dim=-1, keepdim=True)
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp), 0.0)
    return terms.sum(-1)


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
    read: torch.Tensor | None = None,
    select_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(teacher mass per landmark || router)`` of ``queries`` random queries per sequence, plus
    ``select_weight`` times :func:`selection_cross_entropy` (the landmarks' key selection) when positive.

    Args:
        q, k: ``[B, H, N, d]`` (``k`` already repeated to ``H`` heads).
        landmarks: ``[B, H, n_l, d]``, the routing vectors ``r_j``.
        routing: the op's :class:`~mita.ops.causal.CausalRouting` of this forward (the key sets).
        scale, landmark_scale: ``c`` of the key logits, ``lambda`` of the landmark logits.
        queries: queries sampled per sequence (uniformly among those with a landmark to route to).
        read: optional ``[B, N]`` bool, the rows the objective reads: queries are drawn among them
            (:func:`sample_rows`).
        select_weight: the weight of the key-selection term (0: none).

    Returns ``(terms [B, H, S], rows [B, S])``: each sampled query's KL and its position (its mean is the
    loss). The KL carries gradient to ``q`` and ``landmarks`` only through the router logits (the
    selection term to ``landmarks`` and ``k`` through the landmarks' key logits), and the
    term of row ``i`` depends on positions ``<= i`` only. ``S = 0`` when no query has a landmark
    (``N <= b``).
    """
    b = routing.block_size
    bsz, h, n, d = q.shape
    nl = landmarks.shape[2]
    if nl == 0 or n <= b:
        return q.new_zeros(bsz, h, 0), torch.zeros(bsz, 0, dtype=torch.long, device=q.device)
    pos = sample_rows(bsz, n, b, queries, q.device, generator, read)  # [B, S]
    beta = pos // b
    qs = q.gather(2, pos[:, None, :, None].expand(-1, h, -1, d))  # [B, H, S, d]
    teacher = dense_teacher(qs, k, pos, b, scale)
    with torch.no_grad():
        ki = routing.key_index
        if routing.horizon == "prefix":  # [B, H, nq, n_l, kk]: the sets as the query's block sees them
            ki = ki.gather(2, beta[:, None, :, None, None].expand(-1, h, -1, nl, ki.shape[-1]))
            mass = teacher.gather(-1, ki.clamp_min(0).flatten(-2)).view(ki.shape)
            mass = torch.where(ki >= 0, mass, 0.0).sum(-1)  # [B, H, S, n_l]
        else:  # [B, H, n_l, kk], one set per landmark for every query
            mass = landmark_mass(teacher, ki)  # [B, H, S, n_l]
    visible = torch.arange(nl, device=q.device)[None, None, :] < beta[:, :, None]  # [B, S, n_l]
    router = (qs @ landmarks.transpose(-1, -2)) * landmark_scale  # [B, H, S, n_l], with gradient
    terms = distillation_kl(mass, router, visible)
    if select_weight > 0:
        with torch.no_grad():
            pi = torch.softmax(router.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        terms = terms + select_weight * selection_cross_entropy(
            teacher, pi, k, landmarks, pos, block_size=b, scale=scale, horizon=routing.horizon
        )
    return terms, pos


def selection_cross_entropy(
    teacher: torch.Tensor,
    pi: torch.Tensor,
    k: torch.Tensor,
    landmarks: torch.Tensor,
    rows: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    horizon: str,
) -> torch.Tensor:
    """The key-selection term ``[B, H, S]`` of the sampled queries: each landmark's attention over its
    horizon, ``s_j = softmax_{t in H_j} (c r_j . k_t)`` (the distribution whose top-k is its routed key
    set), is taught the dense attention ``p_i`` of the queries that route to it,
    ``sum_j pi_ij * CE(p_i on H_j, s_j)`` with the router's probabilities ``pi`` detached.

    The routing distillation teaches a query to pick the landmark that holds its keys; this teaches the
    landmark to hold them (DeepSeek Sparse Attention's indexer loss, with the landmark as the indexer).
    A cross-entropy: the KL up to the teacher's entropy, which carries no gradient.

    Args:
        teacher: ``[B, H, S, N]``, the detached dense softmax of the sampled queries (:func:`dense_teacher`),
            zero from each query's block on.
        pi: ``[B, H, S, n_l]``, detached routing probabilities, zero on landmarks the query cannot see.
        k, landmarks: ``[B, H, N, d]`` and ``[B, H, n_l, d]`` (gradient flows to both).
        rows: ``[B, S]``, the sampled positions.
        horizon: ``"frozen"`` (``H_j``: keys ``t < (j + 1) b``) or ``"prefix"`` (``t < beta(i) b``).

    The term of row ``i`` reads landmarks ``j < beta(i)`` and keys ``t < beta(i) b`` only.
    """
    n, nl = k.shape[2], landmarks.shape[2]
    logits = (landmarks * scale) @ k.transpose(-1, -2)  # [B, H, n_l, N], with gradient
    t = torch.arange(n, device=k.device)
    if horizon == "frozen":
        inside = t[None, :] < (torch.arange(1, nl + 1, device=k.device) * block_size)[:, None]  # [n_l, N]
        # p_i is zero past beta(i) b, and H_j ends before it for every visible j
        return weighted_cross_entropy(teacher, pi, logits, inside)
    else:  # H_j(beta) = t < beta b: the normaliser at the query block's start, the teacher's support
        # per-block log-sum-exps, then their running total over blocks: a cumulative log-sum-exp over
        # every key position costs ~20x more (its backward) and is read only at block ends
        nc = n // block_size
        lse = logits[..., : nc * block_size].unflatten(-1, (nc, block_size)).logsumexp(-1)
        lse = torch.logcumsumexp(lse, dim=-1)  # [B, H, n_l, n_c]: keys t < (u + 1) b
        last = (rows // block_size - 1).clamp_min(0)  # [B, S]: the last block before the query's
        lse = lse.gather(-1, last[:, None, None, :].expand(-1, lse.shape[1], nl, -1)).transpose(-1, -2)
        ce = lse * teacher.sum(-1, keepdim=True) - teacher @ logits.transpose(-1, -2)  # [B, H, S, n_l]
    return (pi * torch.where(pi > 0, ce, 0.0)).sum(-1)


def weighted_cross_entropy(
    teacher: torch.Tensor, pi: torch.Tensor, logits: torch.Tensor, inside: torch.Tensor
) -> torch.Tensor:
    """``sum_j pi_ij * -sum_t p_i(t) log softmax_{t inside j}(logits_jt)``, ``[B, H, S]``: ``teacher``
    ``[B, H, S, N]`` (zero outside each landmark's keys it is weighed against), ``pi`` ``[B, H, S, m]``,
    ``logits`` ``[B, H, m, N]`` and ``inside`` (bool, broadcastable to ``logits``: the keys landmark ``j``
    selects among). The key-selection term of causal (frozen horizon) and non-causal MiTA."""
    logits = logits.masked_fill(~inside, float("-inf"))
    logs = torch.where(inside, logits - torch.logsumexp(logits, dim=-1, keepdim=True), 0.0)
    ce = -(teacher @ logs.transpose(-1, -2))  # [B, H, S, m]
    return (pi * torch.where(pi > 0, ce, 0.0)).sum(-1)


def block_distillation_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    gate_keys: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    gate_scale: float,
    queries: int,
    generator: torch.Generator | None = None,
    read: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(teacher mass per block || block gate)`` of ``queries`` random queries per sequence (MoBA).

    The teacher is the same detached dense softmax as :func:`routing_distillation_loss`'s; its mass
    inside each complete block ``j < beta(i)``, normalised, is the target of the gate
    ``pi_i = softmax_{j < beta(i)} (gate_scale q_i . g_j)``.

    Args:
        q, k: ``[B, H, N, d]``.
        gate_keys: ``[B, H, n_c, d]``, the gate keys ``g_j`` of the ``n_c = N // block_size`` complete
            blocks (with gradient where the gate should learn).
        block_size: b.
        scale, gate_scale: ``c`` of the key logits, the gate scores' factor.
        queries: queries sampled per sequence (uniformly among ``b <= i < N``).
        read: optional ``[B, N]`` bool, the rows the objective reads (:func:`sample_rows`).

    Returns ``(terms [B, H, S], rows [B, S])`` as :func:`routing_distillation_loss` does; the term of row
    ``i`` depends on positions ``<= i`` only. ``S = 0`` when ``N <= b``.
    """
    b = block_size
    bsz, h, n, d = q.shape
    nc = gate_keys.shape[2]
    if nc == 0 or n <= b:
        return q.new_zeros(bsz, h, 0), torch.zeros(bsz, 0, dtype=torch.long, device=q.device)
    pos = sample_rows(bsz, n, b, queries, q.device, generator, read)  # [B, S]
    qs = q.gather(2, pos[:, None, :, None].expand(-1, h, -1, d))  # [B, H, S, d]
    teacher = dense_teacher(qs, k, pos, b, scale)
    mass = teacher[..., : nc * b].unflatten(-1, (nc, b)).sum(-1)  # [B, H, S, n_c]
    visible = torch.arange(nc, device=q.device)[None, None, :] < (pos // b)[:, :, None]  # [B, S, n_c]
    router = (qs @ gate_keys.transpose(-1, -2)) * gate_scale  # [B, H, S, n_c], with gradient
    return distillation_kl(mass, router, visible), pos
