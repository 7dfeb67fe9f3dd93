"""The MiTA functional op and its backends."""

from .api import mita_attention, triton_available
from .causal import CausalRouting, MiTACache
from .common import Routing

__all__ = ["mita_attention", "MiTACache", "CausalRouting", "Routing", "triton_available"]
