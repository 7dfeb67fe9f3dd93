"""``LinearAttention``: kernelised attention with the ELU+1 feature map (Katharopoulos et al., 2020)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..ops.common import float32_if_half
from .base import AttentionBase, config_of
from .layout import TokenLayout


def elu_feature(x: torch.Tensor) -> torch.Tensor:
    """The positive feature map ``phi(x) = elu(x) + 1``."""
    return F.elu(x) + 1.0


class LinearAttention(AttentionBase):
    """``out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j))``, O(N d^2).

    Padded keys are dropped from both sums. There is no attention matrix to drop out of, so
    ``attn_drop > 0`` raises ValueError. Takes every :class:`mita.nn.base.AttentionBase` option by keyword.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kw: Any) -> None:
        cfg = config_of(locals())
        if kw.get("attn_drop"):
            raise ValueError(
                f"LinearAttention has no attention weights to drop; got attn_drop={kw['attn_drop']}"
            )
        super().__init__(dim, num_heads, **kw)
        self.config = cfg

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: TokenLayout
    ) -> torch.Tensor:
        out_dtype = q.dtype
        q, k, v = float32_if_half(q, k, v)
        fq, fk = elu_feature(q), elu_feature(k)
        if mask is not None:
            fk = fk.masked_fill(mask[:, None, :, None], 0.0)
        kv = fk.transpose(-1, -2) @ v  # [B, H, d, dv]
        norm = fq @ fk.sum(2, keepdim=True).transpose(-1, -2)  # [B, H, N, 1]
        return ((fq @ kv) / norm.clamp_min(torch.finfo(q.dtype).tiny)).to(out_dtype)
