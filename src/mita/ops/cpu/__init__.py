"""Fused CPU backend (``backend="cpu"``): a C++ kernel built on first use, see :mod:`.build`."""

from .build import availability

__all__ = ["availability"]
