"""mita: Mixture-of-Top-k Attention for PyTorch.

``mita_attention`` is the functional op (see ``mita.ops``); landmark builders live in
``mita.landmarks``. Everything here imports on a CPU-only machine with only the core dependencies.
"""

from . import landmarks
from .ops import Routing, mita_attention

__version__ = "0.1.0"
__all__ = ["mita_attention", "Routing", "landmarks", "__version__"]
