"""Hugging Face transformers integration: MiTA as an ``attn_implementation`` for non-causal encoders.

``register()`` adds an attention function to transformers' ``AttentionInterface`` and a matching mask
function to ``AttentionMaskInterface`` (without it the padding mask would arrive as None and padding would
be silently attended). Then ``Model.from_config(config, attn_implementation="mita")`` or
``model.set_attn_implementation("mita")`` routes every self-attention through :func:`mita.mita_attention`.
Needs ``pip install transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..nn.landmark_modes import LandmarkBuilder
from ..nn.layout import resolve_layout
from ..ops import mita_attention


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "mita.integrations.hf needs transformers: pip install transformers (the 'hf' extra)"
        ) from err
    return transformers


def padding_mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: passes the 2-D padding mask ``[B, kv_length]`` (True =
    real token) through unchanged, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"MiTA expects a 2-D [B, N] padding mask, got shape {tuple(attention_mask.shape)}")
    attention_mask = attention_mask[:, -kv_length:].bool()
    return None if bool(attention_mask.all()) else attention_mask


def make_attention_function(
    *,
    num_landmarks: int | tuple[int, int] = 16,
    topk: int = 16,
    experts_per_query: int = 1,
    landmarks: str = "pool",
    layout: str = "seq",
    grid: tuple[int, int] | None = None,
    prefix_tokens: int = 0,
    shared: bool = True,
    routed: bool = True,
    landmark_scale: float | None = None,
    backend: str = "auto",
) -> Callable:
    """Build the ``AttentionInterface`` function with fixed MiTA settings.

    ``landmarks`` may be ``"pool"`` or ``"official"`` (parameter-free modes); ``layout``/``grid``/
    ``prefix_tokens`` describe the tokens as in :class:`mita.nn.MiTAAttention` (e.g. HF ViT: ``"grid"``,
    prefix 1). ``topk`` larger than a sequence is clipped to its length.
    """
    if landmarks not in ("pool", "official"):
        raise ValueError(f"the HF integration supports landmarks 'pool' or 'official', got {landmarks!r}")

    def mita_attention_function(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
            raise ValueError("MiTA attention is non-causal; use it in encoders (is_causal=False)")
        if dropout:
            raise ValueError(
                f"MiTA has no attention dropout; set the model's attention dropout to 0 (got {dropout})"
            )
        b, h, n, d = query.shape
        pad = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
                raise ValueError(
                    "MiTA needs its mask function (register() installs it); got a "
                    f"{attention_mask.dtype} mask of shape {tuple(attention_mask.shape)}"
                )
            pad = ~attention_mask
        tl = resolve_layout(layout, grid, prefix_tokens, n)
        builder = LandmarkBuilder(h * d, h, num_landmarks, landmarks, layout, grid)
        r = builder(query, tl, pad)
        out = mita_attention(
            query, key, value, r, topk=min(topk, key.shape[2]), experts_per_query=experts_per_query,
            scale=scaling, landmark_scale=landmark_scale, shared=shared, routed=routed,
            key_padding_mask=pad, backend=backend,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    return mita_attention_function


def register(name: str = "mita", **settings: Any) -> str:
    """Register MiTA with transformers under ``name`` (attention and mask functions); returns ``name``.

    ``settings`` go to :func:`make_attention_function` (``num_landmarks``, ``topk``, ``layout``, ...).
    """
    tf = _require_transformers()
    fn = make_attention_function(**settings)
    tf.AttentionInterface.register(name, fn)
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(name, padding_mask_function)
    return name
