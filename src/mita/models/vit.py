"""A compact Vision Transformer whose state-dict keys are those of timm's ``VisionTransformer``.

Keys: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``, ``head`` (class-token pooling, LayerNorm eps 1e-6, exact GELU), so a timm
checkpoint of the same shape loads into it and back. timm itself is not needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import Block, LayerNorm, init_weights


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``[B, grid_h * grid_w, dim]`` (raster order)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.img_size or x.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"expected images [B, {self.proj.in_channels}, {self.img_size[0]}, {self.img_size[1]}], "
                f"got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT with a class token; every block's attention is built by :func:`mita.nn.build_attention`.

    Args:
        img_size, patch_size, in_chans: input geometry (square images).
        num_classes: classifier outputs (0: no head, ``forward`` returns the pooled features).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape (timm's names).
        drop_rate, drop_path_rate: dropout after embeddings/in MLPs, and stochastic depth (linear ramp).
        attention: any registry kind (``"mita"``, ``"full"``, ``"agent"``, ``"moba"``, ``"topk"``,
            ``"linear"``).
        attn_kw: extra attention settings (e.g. ``num_landmarks``, ``topk``, ``dwc``); the grid layout
            (``grid``, ``prefix_tokens=1``) is filled in from the patch grid.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attention: str = "mita",
        attn_kw: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        layout = {"layout": "grid", "grid": self.patch_embed.grid_size, "prefix_tokens": 1}
        kw = {**layout, **(attn_kw or {})}
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, attention=attention, qkv_bias=qkv_bias, drop=drop_rate,
                      drop_path=rates[i], attn_kw=kw)
                for i in range(depth)
            ]
        )  # fmt: skip
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes, self.embed_dim, self.attention = num_classes, embed_dim, attention
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW should not decay besides biases and norms (timm's hook)."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> normalised tokens ``[B, 1 + patches, embed_dim]``."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, key_padding_mask=key_padding_mask)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token pooling and the classifier."""
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> logits ``[B, num_classes]`` (or pooled features when ``num_classes == 0``)."""
        return self.forward_head(self.forward_features(x, key_padding_mask))


MODEL_KEYS = (
    "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "qkv_bias", "drop_rate", "drop_path_rate",
)  # fmt: skip

# Presets. vit_fmnist: 28x28x1 inputs with patch 2 give a 14x14 grid + cls = 197 tokens (the DeiT-224
# shape); width 128, depth 4, 4 heads of 32, MLP ratio 2 (~0.55M parameters) keeps an epoch of
# Fashion-MNIST within reach of 2 CPU cores. The others are timm's ViT-Ti/S/B at 224 px, patch 16.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_fmnist": dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=4,
                       num_heads=4, mlp_ratio=2.0),
    "vit_tiny": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192, depth=12,
                     num_heads=3),
    "vit_small": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=12,
                      num_heads=6),
    "vit_base": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                     num_heads=12),
}  # fmt: skip


def build_vit(name: str, attention: str = "mita", **kw: Any) -> VisionTransformer:
    """Build preset ``name`` with overrides; keywords that are not model settings go to the attention.

    The returned model has ``config`` (``{"name", "attention", ...}``) to rebuild it with
    :func:`mita.models.build_model`.
    """
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; choose one of {tuple(VIT_PRESETS)}")
    attn_kw = dict(kw.pop("attn_kw", None) or {})
    model_kw = {k: kw.pop(k) for k in list(kw) if k in MODEL_KEYS}
    attn_kw.update(kw)
    model = VisionTransformer(**{**VIT_PRESETS[name], **model_kw}, attention=attention, attn_kw=attn_kw)
    model.config = {"name": name, "attention": attention, **model_kw, **attn_kw}
    return model


def vit_fmnist(attention: str = "mita", num_classes: int = 10, **attn_kw: Any) -> VisionTransformer:
    """Compact ViT for 28x28x1 images (patch 2, 197 tokens); MiTA default m = k = 25 as the paper's DeiT."""
    return build_vit("vit_fmnist", attention, num_classes=num_classes, **attn_kw)


def vit_tiny(attention: str = "mita", **kw: Any) -> VisionTransformer:
    """ViT-Ti/16 (dim 192, depth 12, 3 heads), timm-compatible keys."""
    return build_vit("vit_tiny", attention, **kw)


def vit_small(attention: str = "mita", **kw: Any) -> VisionTransformer:
    """ViT-S/16 (dim 384, depth 12, 6 heads), timm-compatible keys."""
    return build_vit("vit_small", attention, **kw)


def vit_base(attention: str = "mita", **kw: Any) -> VisionTransformer:
    """ViT-B/16 (dim 768, depth 12, 12 heads), timm-compatible keys."""
    return build_vit("vit_base", attention, **kw)
