"""Model builders: timm-compatible ViTs, a 1-D sequence classifier and a GPT, with any attention kind.

``build_model(name, **kw)`` builds any of ``MODEL_NAMES``; every built model carries ``model.config``
(``{"name": ..., "attention": ..., **settings}``) so ``build_model(**model.config)`` rebuilds it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .gpt import GPT, build_gpt
from .segmenter import Segmenter, build_segmenter
from .sequence import SequenceClassifier, build_sequence, sinusoidal_positions
from .vit import VIT_PRESETS, VisionTransformer, build_vit, vit_base, vit_fmnist, vit_small, vit_tiny

MODEL_NAMES = (*VIT_PRESETS, "seq", "gpt", "segmenter")


def build_model(name: str, **kw: Any) -> nn.Module:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) with settings ``kw`` (``attention=`` any kind).

    ViT presets take model settings (``embed_dim``, ``depth``, ``num_classes``, ...) and pass any other
    keyword to the attention; ``"seq"`` takes :class:`SequenceClassifier`'s arguments; ``"gpt"`` takes
    :class:`GPT`'s (causal ``attention``: ``"full" | "mita" | "moba" | "window"``); ``"segmenter"``
    :class:`Segmenter`'s (model and decoder settings; any other keyword goes to the encoder's attention).
    """
    if name == "seq":
        return build_sequence(**kw)
    if name == "gpt":
        return build_gpt(**kw)
    if name == "segmenter":
        return build_segmenter(**kw)
    if name in VIT_PRESETS:
        return build_vit(name, **kw)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


__all__ = [
    "MODEL_NAMES",
    "build_model",
    "VisionTransformer",
    "SequenceClassifier",
    "GPT",
    "Segmenter",
    "build_segmenter",
    "build_gpt",
    "build_vit",
    "build_sequence",
    "vit_fmnist",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "sinusoidal_positions",
]
