"""Causal MiTA (SPEC §5): the dense reference beside the block-major torch path, and the decoding
cache :class:`MiTACache`."""

from .cache import MiTACache
from .common import CausalProblem, CausalRouting, validate_causal
from .op import causal_attention

__all__ = ["MiTACache", "CausalProblem", "CausalRouting", "causal_attention", "validate_causal"]
