"""``FullAttention``: exact softmax attention through ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import AttentionBase, config_of
from .layout import TokenLayout


class FullAttention(AttentionBase):
    """Standard multi-head attention with timm's parameter names; ``softmax(q k^T / sqrt(d)) v``.

    Takes every :class:`mita.nn.base.AttentionBase` option (``qkv_bias``, ``qk_norm``, ``dwc``, ``gate``,
    ``rope``, layout, ...) by keyword. Padded keys (``key_padding_mask`` True) get zero weight.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kw: Any) -> None:
        cfg = config_of(locals())
        super().__init__(dim, num_heads, **kw)
        self.config = cfg

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: TokenLayout
    ) -> torch.Tensor:
        keep = None if mask is None else ~mask[:, None, None, :]  # SDPA: True = take part
        p = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
