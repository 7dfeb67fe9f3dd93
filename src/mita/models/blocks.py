"""Pre-norm transformer block with timm's ``Block`` parameter names.

Names: ``norm1``, ``attn``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from ..nn import build_attention

# timm's ViTs use LayerNorm with eps 1e-6; the same here keeps timm checkpoints numerically equivalent.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Mlp(nn.Module):
    """``fc2(drop(GELU(fc1(x))))`` as timm's ``Mlp``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; ``attention`` is any :mod:`mita.nn` kind."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        attention: str = "mita",
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        attn_kw: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = build_attention(
            attention, dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop, **(attn_kw or {})
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), key_padding_mask=key_padding_mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """timm-like init: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
