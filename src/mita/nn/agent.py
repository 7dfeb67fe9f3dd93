"""``AgentAttention``: pooled agent tokens summarise the keys, queries read the agents (Agent attention).

``A = pool(Q)`` (m agents), ``V_A = softmax(A K^T / sqrt(d)) V``, ``out = softmax(Q A^T / sqrt(d)) V_A``:
both steps use ``1/sqrt(d)`` as the Agent attention paper (no agent bias, no DWC unless ``dwc=True``).
This is MiTA's shared expert alone, with ``lambda = 1/sqrt(d)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import AttentionBase, config_of
from .landmark_modes import LandmarkBuilder, landmark_mode_arg
from .layout import TokenLayout


class AgentAttention(AttentionBase):
    """Agent attention with timm's parameter names.

    Args (beyond :class:`mita.nn.base.AttentionBase`):
        num_landmarks: number of agent tokens m (square or ``(mh, mw)`` on a grid; default 49 = 7x7).
        landmark_mode: how agents are built (same modes as MiTA; default ``"pool"``); ``landmarks=`` is
            its deprecated old name.
        conv_kernel, landmark_seed: options of the ``"conv"`` and ``"random"`` agent modes.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_landmarks: int | tuple[int, int] = 49,
        landmark_mode: str = "pool",
        conv_kernel: int | tuple[int, int] | None = None,
        landmark_seed: int = 0,
        landmarks: str | None = None,
        **kw: Any,
    ) -> None:
        cfg = config_of(locals())
        landmark_mode = landmark_mode_arg(landmark_mode, cfg.pop("landmarks"), type(self).__name__)
        cfg["landmark_mode"] = landmark_mode
        super().__init__(dim, num_heads, **kw)
        self.landmark = LandmarkBuilder(
            dim, num_heads, num_landmarks, landmark_mode, self.layout, self.grid, conv_kernel, landmark_seed
        )
        self.landmark.to(device=kw.get("device"), dtype=kw.get("dtype"))
        self.num_landmarks, self.landmark_mode = self.landmark.m, landmark_mode
        self.config = cfg

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: TokenLayout
    ) -> torch.Tensor:
        agents = self.landmark(q, tl, mask)  # [B, H, m, d]
        logits = (agents @ k.transpose(-1, -2)) * self.scale
        if mask is not None:
            logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
        agent_v = self.attn_drop(logits.softmax(-1)) @ v
        weights = self.attn_drop(((q @ agents.transpose(-1, -2)) * self.scale).softmax(-1))
        return weights @ agent_v
