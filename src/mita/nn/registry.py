"""One registry for every attention kind: ``build_attention(kind, dim, num_heads, **kw)``, and the keyword
rule it shares with the causal mixers' registry (:func:`mita.nn.causal.build_causal_mixer`): options a kind
does not take raise ValueError naming them; a caller that carries one set of settings across kinds filters
it first (:func:`filter_kwargs`, :func:`mita.nn.causal.filter_causal_kwargs`)."""

from __future__ import annotations

from collections.abc import Collection
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


def check_kwargs(what: str, kind: str, kw: dict[str, Any], accepted: Collection[str]) -> None:
    """ValueError naming the options in ``kw`` that ``what`` kind ``kind`` does not take (``accepted``)."""
    unknown = set(kw) - set(accepted)
    if unknown:
        raise ValueError(f"{what} kind {kind!r} does not take {sorted(unknown)}")


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
    check_kwargs("attention", kind, kw, cls.accepted_kwargs())
    return cls(dim, num_heads=num_heads, **kw)


def filter_kwargs(kind: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kw`` that attention ``kind`` accepts (to carry common settings across kinds)."""
    accepted = attention_class(kind).accepted_kwargs()
    return {k: v for k, v in kw.items() if k in accepted}
