"""Small launch helpers shared by the kernels."""

from __future__ import annotations

import torch


def pow2(x: int, floor: int = 16) -> int:
    """Smallest power of two >= x and >= floor (``tl.dot`` needs block sides of at least 16)."""
    p = floor
    while p < x:
        p *= 2
    return p


# Largest block along landmarks, routed keys and key/query sequences. Tests lower it to exercise the
# multi-block loops at interpreter-sized inputs.
BLOCK_CAP = 64


def block(x: int) -> int:
    """Block side for an extent of ``x``: a power of two in ``16 .. BLOCK_CAP``."""
    return min(max(16, BLOCK_CAP), pow2(x))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact IEEE float32 for float32 inputs (TF32 would change top-k choices
    against the reference), the native tensor-core path for half types."""
    return "ieee" if dtype == torch.float32 else "tf32"


def default_splits(programs: int, length: int, device: torch.device) -> int:
    """Chunks a long reduction (over keys or queries) is split into so that ``programs * splits``
    fills a GPU (about 4 programs per SM), with at least 1024 items per chunk; 1 on CPU, where the
    interpreter gains nothing from splitting."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(target, programs), cdiv(length, 1024)))


def chunking(length: int, splits: int, block: int) -> tuple[int, int]:
    """(chunk, splits): chunks of whole blocks covering ``length``, and how many there really are."""
    chunk = cdiv(cdiv(length, splits), block) * block
    return chunk, cdiv(length, chunk)
