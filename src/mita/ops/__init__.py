"""The MiTA functional ops and their backends.

:func:`mita_attention` (SPEC §2) and its sibling :func:`mita_causal_attention` (SPEC §5) mirror each other
file for file: ``api.py``, ``common.py``, ``reference.py``, ``torch_backend.py`` and ``cpu_backend.py`` here
and in :mod:`.causal`; the fused CPU kernels and their build are in :mod:`.cpu`, the Triton kernels in
:mod:`.triton`, the option checks both ops share in :mod:`.arguments`.
"""

from .api import mita_attention, triton_available
from .causal import CausalRouting, MiTACache, mita_causal_attention
from .common import Routing

__all__ = [
    "mita_attention",
    "mita_causal_attention",
    "MiTACache",
    "CausalRouting",
    "Routing",
    "triton_available",
]
