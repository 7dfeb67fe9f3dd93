"""The MiTA functional op and its backends."""

from .api import mita_attention, triton_available
from .common import Routing

__all__ = ["mita_attention", "Routing", "triton_available"]
