"""``MiTAAttention``: a drop-in replacement for timm's ``Attention`` that mixes tokens with MiTA (SPEC §2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import Routing, mita_attention
from ..ops.api import BACKENDS
from ..ops.arguments import as_bool, as_experts, as_int, as_scale, as_weight
from .base import AttentionBase, config_of
from .causal_router import attach_loss
from .landmark_modes import LandmarkBuilder, landmark_mode_arg
from .layout import TokenLayout
from .router import ROUTERS, routing_distillation_loss


def mita_mix(
    landmark: LandmarkBuilder,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    tl: TokenLayout,
    *,
    topk: int,
    experts_per_query: int = 1,
    scale: float | None = None,
    landmark_scale: float | None = None,
    shared: bool = True,
    routed: bool = True,
    dedup: bool = False,
    backend: str = "auto",
    return_routing: bool = False,
    landmarks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Routing]:
    """MiTA's token mixing of head-split ``q`` ``[B, H, N, d]``, ``k``/``v`` ``[B, Hkv, N, d]``: landmarks
    from ``landmark`` for layout ``tl`` (or ``landmarks``, already built so), then
    :func:`mita.mita_attention`. ``mask`` [B, N], True = padding.

    The body of :meth:`MiTAAttention.attend`, shared with the Hugging Face integration.
    """
    n = q.shape[2]
    if topk > n:
        raise ValueError(f"topk={topk} exceeds the sequence length N={n}")
    if landmark.m > n:
        raise ValueError(f"num_landmarks={landmark.m} exceeds the sequence length N={n}")
    r = landmark(q, tl, mask) if landmarks is None else landmarks  # [B, H, m, d]
    return mita_attention(
        q, k, v, r, topk=topk, experts_per_query=experts_per_query, scale=scale,
        landmark_scale=landmark_scale, shared=shared, routed=routed, dedup=dedup, key_padding_mask=mask,
        backend=backend, return_routing=return_routing,
    )  # fmt: skip


class MiTAAttention(AttentionBase):
    """Mixture-of-Top-k attention with timm's parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``).

    Each query attends, in one softmax, to the m landmarks (shared expert) and to the ``topk`` keys of
    its ``experts_per_query`` best landmarks (routed experts); see :func:`mita.mita_attention`.

    Args (beyond :class:`mita.nn.base.AttentionBase`):
        num_landmarks: m; on a grid a square number or ``(mh, mw)``.
        topk: k, keys per routed expert.
        experts_per_query: s, routed experts per query.
        landmark_mode: ``"pool"`` | ``"official"`` | ``"random"`` | ``"learned"`` | ``"conv"``
            (see :mod:`mita.nn.landmark_modes`); ``landmarks=`` is its deprecated old name.
        shared, routed: keep the shared / routed experts (SPEC §2 item 5 ablations).
        landmark_scale: lambda of the landmark logits (default ``1 / head_dim``).
        backend: op backend, ``"auto"`` | ``"torch"`` | ``"reference"`` | ``"triton"``.
        conv_kernel, landmark_seed: options of the ``"conv"`` and ``"random"`` landmark modes.
        dedup: with ``experts_per_query > 1``, count a key offered by several experts once.
        num_kv_heads: grouped-query attention (passed to the op unexpanded).
        router: how the routing ``argmax_j q . r_j`` learns (:data:`mita.nn.router.ROUTERS`; docs/causal.md,
            "Routing that learns"). ``"argmax"`` (default): the op alone, the routing gets no gradient.
            ``"distill"``: in training (and with gradients on), a routing distillation loss from dense
            attention (:mod:`mita.nn.router`) on ``distill_queries`` queries per sequence, weight
            ``distill_weight``, attached to the output (unchanged bit for bit) so that its gradient joins
            the task loss's in the same backward pass. Needs the routed experts (``routed=True``).
            ``"distill+select"``: also the key-selection term (weight ``select_weight``): each landmark's
            attention over the keys, whose top-k is its routed key set, learns the dense attention of the
            sampled queries that route to it.
        distill_weight, distill_queries: the distillation loss's weight and sampled queries per sequence.
        select_weight: the key-selection term's weight (relative to the routing KL), with ``"+select"``
            (1, as measured on the ViT; causal MiTA scales its default with the block, min(0.3, b / 64)).

    Non-causal: causal MiTA (SPEC §5) is the causal mixer :class:`mita.nn.causal.MiTACausal` (the GPT's
    ``attention="mita"``), on :func:`mita.mita_causal_attention`.

    With a padding mask no landmark reads a padded token, in every layout and landmark mode (see
    :class:`mita.nn.landmark_modes.LandmarkBuilder`); in the ``"seq"`` layout with ``"pool"`` a padded
    sequence gets the landmarks of the unpadded one.

    Attention-weight dropout is not available in the op: ``attn_drop > 0`` raises ValueError.
    Set ``record_routing = True`` to keep the last forward's :class:`mita.Routing` in ``last_routing``
    (detached) and its layout in ``last_layout``.
    """

    native_gqa = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
        num_landmarks: int | tuple[int, int] = 25,
        topk: int = 25,
        experts_per_query: int = 1,
        landmark_mode: str = "pool",
        layout: str = "grid",
        grid: tuple[int, int] | None = None,
        prefix_tokens: int = 1,
        dwc: bool = False,
        gate: bool = False,
        rope: bool | float | None = None,
        shared: bool = True,
        routed: bool = True,
        landmark_scale: float | None = None,
        backend: str = "auto",
        conv_kernel: int | tuple[int, int] | None = None,
        landmark_seed: int = 0,
        dedup: bool = False,
        num_kv_heads: int | None = None,
        scale_norm: bool = False,
        landmarks: str | None = None,
        router: str = "argmax",
        distill_weight: float = 1.0,
        distill_queries: int = 32,
        select_weight: float = 1.0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        cfg = config_of(locals())
        landmark_mode = landmark_mode_arg(landmark_mode, cfg.pop("landmarks"), type(self).__name__)
        cfg["landmark_mode"] = landmark_mode
        if attn_drop:
            raise ValueError(f"MiTAAttention has no attention-weight dropout; got attn_drop={attn_drop}")
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias, attn_drop=0.0,
            proj_drop=proj_drop, norm_layer=norm_layer, scale_norm=scale_norm, layout=layout, grid=grid,
            prefix_tokens=prefix_tokens, dwc=dwc, gate=gate, rope=rope, num_kv_heads=num_kv_heads,
            device=device, dtype=dtype,
        )  # fmt: skip
        # Options checked here, as the op would check them, so a bad one fails before the first forward.
        topk = as_int("topk", topk)
        (shared, routed), dedup = as_experts(shared, routed), as_bool("dedup", dedup)
        landmark_scale = as_scale("landmark_scale", landmark_scale)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if router != "argmax" and not routed:
            raise ValueError(f"router={router!r} trains the routed experts' routing; it needs routed=True")
        distill_weight = as_weight("distill_weight", distill_weight)
        select_weight = as_weight("select_weight", select_weight)
        distill_queries = as_int("distill_queries", distill_queries)
        self.landmark = LandmarkBuilder(
            dim, num_heads, num_landmarks, landmark_mode, layout, self.grid, conv_kernel, landmark_seed
        )
        self.landmark.to(device=device, dtype=dtype)
        m = self.landmark.m
        experts_per_query = as_int("experts_per_query", experts_per_query, 1, m, what=f"m={m}")
        self.num_landmarks, self.topk, self.experts_per_query = m, topk, experts_per_query
        self.landmark_mode = landmark_mode
        self.shared, self.routed = shared, routed
        self.landmark_scale, self.backend, self.dedup = landmark_scale, backend, dedup
        self.router, self.distill_weight, self.distill_queries = router, distill_weight, distill_queries
        self.select_weight = select_weight
        self.config = cfg
        self.record_routing = False
        self.last_routing: Routing | None = None
        self.last_layout: dict | None = None
        self.last_key_padding_mask: torch.Tensor | None = None  # the [B, N] mask of that forward

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: TokenLayout
    ) -> torch.Tensor:
        distill = self.router != "argmax" and self.training and torch.is_grad_enabled()
        distill = distill and self.distill_weight > 0
        r = self.landmark(q, tl, mask) if distill else None  # the landmarks the loss's router reads
        res = mita_mix(
            self.landmark, q, k, v, mask, tl, topk=self.topk, experts_per_query=self.experts_per_query,
            landmark_scale=self.landmark_scale, shared=self.shared, routed=self.routed, dedup=self.dedup,
            backend=self.backend, return_routing=self.record_routing or distill, landmarks=r,
        )  # fmt: skip
        if not (self.record_routing or distill):
            return res
        out, routing = res
        if distill:
            d = q.shape[-1]
            terms, rows = routing_distillation_loss(
                q, k, r, routing.key_index, scale=d**-0.5,
                landmark_scale=self.landmark_scale if self.landmark_scale is not None else 1.0 / d,
                queries=self.distill_queries, key_padding_mask=mask,
                select_weight=self.select_weight if self.router == "distill+select" else 0.0,
            )  # fmt: skip
            out = attach_loss(out, terms * (self.distill_weight / terms.numel()), rows)
        if not self.record_routing:
            return out
        self.last_routing = Routing(routing.expert_index.detach(), routing.key_index.detach())
        self.last_key_padding_mask = None if mask is None else mask.detach()
        self.last_layout = {"layout": tl.kind, "grid": tl.grid, "prefix_tokens": tl.prefix}
        self.last_layout["num_landmarks"] = self.num_landmarks
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, topk={self.topk}, "
            f"experts_per_query={self.experts_per_query}, landmark_mode={self.landmark_mode!r}"
        )

    @property
    def landmarks_mode(self) -> str:
        """Deprecated old name of :attr:`landmark_mode`."""
        return self.landmark_mode

    @landmarks_mode.setter
    def landmarks_mode(self, mode: str) -> None:
        self.landmark_mode = mode
