"""Attention modules: MiTA, its variants and the baselines, all with timm's ``Attention`` parameter names.

``build_attention(kind, dim, num_heads, **kw)`` builds any of them by name (``ATTENTION_KINDS``).
"""

from .agent import AgentAttention
from .base import AttentionBase
from .full import FullAttention
from .linear import LinearAttention
from .mita import MiTAAttention
from .moba import MoBAAttention
from .registry import ATTENTION_CLASSES, ATTENTION_KINDS, attention_class, build_attention
from .topk import TopKAttention

__all__ = [
    "AttentionBase",
    "MiTAAttention",
    "FullAttention",
    "AgentAttention",
    "MoBAAttention",
    "TopKAttention",
    "LinearAttention",
    "build_attention",
    "attention_class",
    "ATTENTION_KINDS",
    "ATTENTION_CLASSES",
]
