"""Small launch helpers shared by the kernels."""

from __future__ import annotations

import torch


def pow2(x: int, floor: int = 16) -> int:
    """Smallest power of two >= x and >= floor (``tl.dot`` needs block sides of at least 16)."""
    p = floor
    while p < x:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact IEEE float32 for float32 inputs (TF32 would change top-k choices
    against the reference), the native tensor-core path for half types."""
    return "ieee" if dtype == torch.float32 else "tf32"
