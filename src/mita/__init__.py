"""mita: Mixture-of-Top-k Attention for PyTorch.

``mita_attention`` is the functional op and ``mita_causal_attention`` its causal sibling (see ``mita.ops``);
landmark builders live in ``mita.landmarks``; modules in ``mita.nn``; models in ``mita.models``;
``mita.convert`` swaps the attention of any model. Everything here imports on a CPU-only machine with
only the core dependencies; subpackages load on first use. "SPEC §N" in docstrings refers to section N
of docs/spec.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import landmarks
from .convert import convert  # eager: a lazy name would be shadowed by the submodule once imported
from .ops import MiTACache, Routing, mita_attention, mita_causal_attention

__version__ = "0.1.0"
__all__ = [
    "mita_attention",
    "mita_causal_attention",
    "MiTACache",
    "Routing",
    "landmarks",
    "convert",
    "__version__",
]

_SUBPACKAGES = ("nn", "models", "data", "train", "analysis", "bench", "integrations", "ops")


def __getattr__(name: str) -> Any:
    # Lazy: keeps `import mita` light and free of optional dependencies.
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mita' has no attribute {name!r}")
