"""``Segmenter`` (Strudel et al., 2021): a ViT encoder and a linear or mask-transformer decoder.

The encoder is :class:`mita.models.vit.VisionTransformer` without a head (timm's parameter names under
``encoder.``, a prefix class token that the decoder drops). Decoders:

- ``"linear"``: a linear layer from each patch token to class logits;
- ``"mask"`` (mask transformer): the patch tokens, projected to the decoder width, are joined by
  ``num_classes`` learnable class embeddings *after* them; transformer blocks mix all of them; the masks
  are the products of the L2-normalised patch features with the L2-normalised class features, then a
  LayerNorm over the classes.

Either way the patch-grid logits are upsampled bilinearly to the image: ``forward`` returns
``[B, num_classes, H, W]``.

Attention: the encoder uses any registry kind (``attention``). The decoder blocks use
``decoder_attention`` (default ``"full"``); with ``"mita"`` (or any landmark kind) the layout is the
patch grid with no prefix and the class embeddings as *suffix* tokens, so they are queries, keys and
values but are not pooled into landmarks (as the authors' decoder pools ``q[:, :-n_cls]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.registry import filter_kwargs
from .blocks import Block, LayerNorm, init_weights
from .vit import MODEL_KEYS, VisionTransformer

__all__ = ["Segmenter", "MaskTransformer", "LinearDecoder", "build_segmenter", "DECODERS"]

DECODERS = ("mask", "linear")


class LinearDecoder(nn.Module):
    """Segmenter's ``"linear"`` decoder: patch tokens ``[B, N, D]`` -> grid logits ``[B, C, gh, gw]``."""

    def __init__(self, dim: int, num_classes: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return self.head(x).transpose(1, 2).reshape(b, -1, *self.grid)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer (see the module docstring).

    Args:
        dim: encoder width (of the patch tokens it receives).
        num_classes: classes = class embeddings = output masks.
        grid: the patch grid ``(gh, gw)``.
        depth, decoder_dim, num_heads, mlp_ratio: the decoder transformer.
        attention: the decoder blocks' attention kind; ``attn_kw`` its settings (the layout is fixed here:
            the grid, no prefix, the class embeddings as suffix tokens).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        grid: tuple[int, int],
        *,
        depth: int = 1,
        decoder_dim: int = 64,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        attention: str = "full",
        attn_kw: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.grid, self.num_classes = grid, num_classes
        layout = {"layout": "grid", "grid": grid, "prefix_tokens": 0}  # suffix: the class embeddings
        kw = {**(attn_kw or {}), **layout}
        self.proj_dec = nn.Linear(dim, decoder_dim)
        self.blocks = nn.ModuleList(
            [Block(decoder_dim, num_heads, mlp_ratio, attention=attention, attn_kw=kw) for _ in range(depth)]
        )
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, decoder_dim))
        scale = decoder_dim**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(decoder_dim, decoder_dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(decoder_dim, decoder_dim))
        self.decoder_norm = LayerNorm(decoder_dim)
        self.mask_norm = LayerNorm(num_classes)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, N, dim]`` -> grid logits ``[B, num_classes, gh, gw]``."""
        b, n, _ = x.shape
        x = torch.cat((self.proj_dec(x), self.cls_emb.expand(b, -1, -1)), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, N, C]
        return masks.transpose(1, 2).reshape(b, self.num_classes, *self.grid)


class Segmenter(nn.Module):
    """ViT encoder + decoder; ``forward(images [B, C, H, W]) -> logits [B, num_classes, H, W]``.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate,
            drop_path_rate: the encoder (:class:`mita.models.vit.VisionTransformer`, timm's names).
        num_classes: classes per pixel (background included).
        attention, attn_kw: the encoder's attention kind and settings (e.g. ``num_landmarks``, ``topk``).
        decoder: ``"mask"`` (mask transformer) or ``"linear"``.
        decoder_depth, decoder_dim, decoder_heads: the mask transformer (default width and heads: the
            encoder's).
        decoder_attention: the mask transformer's attention kind (default ``"full"``).
        decoder_attn_kw: its settings; default: the encoder's settings that kind takes when it is the
            encoder's kind (``decoder_attention="mita"`` under a MiTA encoder keeps its m and k), else none.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 11,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attention: str = "mita",
        attn_kw: dict[str, Any] | None = None,
        decoder: str = "mask",
        decoder_depth: int = 1,
        decoder_dim: int | None = None,
        decoder_heads: int | None = None,
        decoder_attention: str = "full",
        decoder_attn_kw: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.encoder = VisionTransformer(
            img_size, patch_size, in_chans, 0, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate,
            drop_path_rate, attention=attention, attn_kw=attn_kw,
        )  # fmt: skip
        grid = self.encoder.patch_embed.grid_size
        self.num_classes, self.attention, self.decoder_kind = num_classes, attention, decoder
        self.decoder_attention = decoder_attention
        if decoder == "linear":
            self.decoder: nn.Module = LinearDecoder(embed_dim, num_classes, grid)
        else:
            if decoder_attn_kw is None:
                same = decoder_attention == attention
                decoder_attn_kw = filter_kwargs(decoder_attention, attn_kw or {}) if same else {}
            self.decoder = MaskTransformer(
                embed_dim, num_classes, grid, depth=decoder_depth, decoder_dim=decoder_dim or embed_dim,
                num_heads=decoder_heads or num_heads, mlp_ratio=mlp_ratio, attention=decoder_attention,
                attn_kw=decoder_attn_kw,
            )  # fmt: skip

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.encoder.patch_embed.grid_size

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW should not decay besides biases and norms (timm's hook)."""
        out = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return out | ({"decoder.cls_emb"} if self.decoder_kind == "mask" else set())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> per-pixel logits ``[B, num_classes, H, W]``."""
        h, w = x.shape[-2:]
        tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens :]
        masks = self.decoder(tokens)
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)


_SEG_KEYS = (
    "decoder", "decoder_depth", "decoder_dim", "decoder_heads", "decoder_attention", "decoder_attn_kw",
)  # fmt: skip


def build_segmenter(attention: str = "mita", **kw: Any) -> Segmenter:
    """A :class:`Segmenter`; keywords that are neither model nor decoder settings go to the encoder's
    attention. The model carries ``config`` to rebuild it with :func:`mita.models.build_model`."""
    attn_kw = dict(kw.pop("attn_kw", None) or {})
    model_kw = {k: kw.pop(k) for k in list(kw) if k in MODEL_KEYS or k in _SEG_KEYS}
    attn_kw.update(kw)
    model = Segmenter(**model_kw, attention=attention, attn_kw=attn_kw)
    model.config = {"name": "segmenter", "attention": attention, **model_kw, **attn_kw}
    return model
