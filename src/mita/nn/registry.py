"""One registry for every attention kind: ``build_attention(kind, dim, num_heads, **kw)``."""

from __future__ import annotations

from typing import Any

from .agent import AgentAttention
from .base import AttentionBase
from .full import FullAttention
from .linear import LinearAttention
from .mita import MiTAAttention
from .moba import MoBAAttention
from .topk import TopKAttention

ATTENTION_CLASSES: dict[str, type[AttentionBase]] = {
    "mita": MiTAAttention,
    "full": FullAttention,
    "agent": AgentAttention,
    "moba": MoBAAttention,
    "topk": TopKAttention,
    "linear": LinearAttention,
}
ATTENTION_KINDS = tuple(ATTENTION_CLASSES)


def attention_class(kind: str) -> type[AttentionBase]:
    """The module class registered as ``kind``; ValueError listing the kinds otherwise."""
    try:
        return ATTENTION_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {ATTENTION_KINDS}") from None


def build_attention(kind: str, dim: int, num_heads: int, **kw: Any) -> AttentionBase:
    """Build the attention module registered as ``kind`` (``"mita" | "full" | "agent" | "moba" | "topk" |
    "linear"``) with timm-style constructor keywords (``qkv_bias``, ``layout``, ``num_landmarks``, ...).

    Keywords the kind does not take raise ValueError naming them.
    """
    cls = attention_class(kind)
    unknown = set(kw) - cls.accepted_kwargs()
    if unknown:
        raise ValueError(f"attention kind {kind!r} does not take {sorted(unknown)}")
    return cls(dim, num_heads=num_heads, **kw)


def filter_kwargs(kind: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kw`` that attention ``kind`` accepts (to carry common settings across kinds)."""
    accepted = attention_class(kind).accepted_kwargs()
    return {k: v for k, v in kw.items() if k in accepted}
