"""Routing distillation for non-causal MiTA (``MiTAAttention(router="distill")``).

The routing ``argmax_j q . r_j`` passes no gradient, so nothing in the task loss trains it. As for causal
MiTA (:mod:`mita.nn.causal_router`), a training-only loss distils it from dense attention: for a sample of
queries ``i`` per sequence, the teacher is the dense softmax of ``c q_i . k_t`` over all real (unpadded)
keys, detached; its mass inside each landmark's routed key set, normalised over the landmarks, is the
target of the router ``pi_i = softmax_j(lambda q_i . r_j)`` under ``KL(target || pi_i)``. The terms are
attached to the output with :func:`mita.nn.causal_router.attach_loss`, so the forward output is unchanged
and no training loop has to know about the loss.
"""

from __future__ import annotations

import torch

from .causal_router import distillation_kl, landmark_mass, weighted_cross_entropy

__all__ = ["ROUTERS", "routing_distillation_loss"]

#: How non-causal MiTA's router learns (``MiTAAttention(router=...)``): ``"argmax"``, the op alone (the
#: routing gets no gradient); ``"distill"``, plus the routing distillation loss of this module;
#: ``"distill+select"``, plus its key-selection term (each landmark's attention, whose top-k is its
#: routed key set, learns the dense attention of the sampled queries that route to it).
ROUTERS = ("argmax", "distill", "distill+select")


def routing_distillation_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    landmarks: torch.Tensor,
    key_index: torch.Tensor,
    *,
    scale: float,
    landmark_scale: float,
    queries: int,
    key_padding_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    select_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(teacher mass per landmark || router)`` of ``queries`` random queries per sequence.

    Args:
        q: ``[B, H, N, d]`` queries.
        k: ``[B, Hkv, N, d]`` keys, ``H % Hkv == 0`` (query head ``h`` reads key head ``h // (H // Hkv)``).
        landmarks: ``[B, H, m, d]``, the routing vectors ``r_j``.
        key_index: ``[B, H, m, k]``, each landmark's routed keys (:class:`mita.Routing`'s ``key_index``).
        scale, landmark_scale: ``c`` of the key logits, ``lambda`` of the landmark logits.
        queries: queries sampled per sequence, uniformly with replacement among its unpadded positions.
        key_padding_mask: ``[B, N]`` bool, True = padding: padded keys are outside the teacher, padded
            queries are not sampled.
        select_weight: the weight of the key-selection term (0: none):
            ``sum_j pi_ij * CE(p_i, softmax_t(c r_j . k_t))`` with the router's ``pi`` detached, as
            :func:`mita.nn.causal_router.selection_cross_entropy` over every unpadded key.

    Returns ``(terms [B, H, S], rows [B, S])``: each sampled query's KL (plus the selection term) and its
    position (their mean is the loss). The KL carries gradient to ``q`` and ``landmarks`` only through
    the router logits; the selection term to ``landmarks`` and ``k`` through the landmarks' key logits.
    """
    bsz, h, n, d = q.shape
    hkv = k.shape[1]
    if key_padding_mask is None:
        pos = torch.randint(n, (bsz, queries), device=q.device, generator=generator)  # [B, S]
    else:
        real = (~key_padding_mask).float()
        pos = torch.multinomial(real, queries, replacement=True, generator=generator)
    qs = q.gather(2, pos[:, None, :, None].expand(-1, h, -1, d))  # [B, H, S, d]
    with torch.no_grad():
        # query head h = kv * g + j reads key head kv: group the query heads instead of repeating k
        grouped = (qs * scale).view(bsz, hkv, h // hkv, queries, d)
        logits = (grouped @ k[:, :, None].transpose(-1, -2)).view(bsz, h, queries, n)  # [B, H, S, N]
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        teacher = torch.softmax(logits, dim=-1)
        mass = landmark_mass(teacher, key_index)  # [B, H, S, m]
    router = (qs @ landmarks.transpose(-1, -2)) * landmark_scale  # [B, H, S, m], with gradient
    terms = distillation_kl(mass, router)
    if select_weight > 0:
        m = landmarks.shape[2]
        grouped = (landmarks * scale).view(bsz, hkv, h // hkv, m, d)
        kk = k if key_padding_mask is None else k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        sel = (grouped @ kk[:, :, None].transpose(-1, -2)).view(bsz, h, m, n)  # [B, H, m, N], with gradient
        # padded keys are outside every landmark's choice (zeroed above: what they hold never matters)
        inside = torch.ones(1, 1, 1, n, dtype=torch.bool, device=k.device)
        if key_padding_mask is not None:
            inside = ~key_padding_mask[:, None, None, :]
        pi = torch.softmax(router.detach(), dim=-1)
        terms = terms + select_weight * weighted_cross_entropy(teacher, pi, sel, inside)
    return terms, pos
