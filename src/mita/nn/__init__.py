"""Attention modules: MiTA, its variants and the baselines, all with timm's ``Attention`` parameter names.

``build_attention(kind, dim, num_heads, **kw)`` builds any of them by name (``ATTENTION_KINDS``); these are
non-causal. The causal mixers of decoders (``full``, ``mita``: :class:`MiTACausal`, ``moba``, ``window``) are
in :mod:`mita.nn.causal`, built by name with ``build_causal_mixer(kind, **kw)`` (``CAUSAL_KINDS``).
"""

from .agent import AgentAttention
from .base import AttentionBase
from .causal import CAUSAL_KINDS, MiTACausal, build_causal_mixer
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
    "MiTACausal",
    "build_causal_mixer",
    "CAUSAL_KINDS",
]
