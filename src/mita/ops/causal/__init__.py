"""Causal MiTA (SPEC §5): the dense reference beside the block-major torch path, and the decoding
cache :class:`MiTACache`."""

from .api import causal_attention
from .cache import MiTACache
from .common import CausalProblem, CausalRouting, validate_causal

__all__ = ["MiTACache", "CausalProblem", "CausalRouting", "causal_attention", "validate_causal"]
