"""What the kernel files share: block sizes, loads and stores by row index, and the launch fallback.

Launches go through :func:`launch`, which passes every argument by keyword. The default blocks and
``num_stages`` were chosen for H100-class shared memory (up to 227 KiB per block). On a smaller GPU
Triton raises ``OutOfResources`` at launch; :func:`launch` then retries with one pipeline stage, then
with the loop-only blocks halved (blocks that change neither the grid nor any buffer), and remembers
what worked for that kernel and configuration.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .interpreter import interpreter_requested

# Largest block along landmarks, routed keys and key/query sequences. Tests lower it to exercise the
# multi-block loops at interpreter-sized inputs.
BLOCK_CAP = 64


def pow2(x: int, floor: int = 16) -> int:
    """Smallest power of two >= x and >= floor (``tl.dot`` needs block sides of at least 16)."""
    p = floor
    while p < x:
        p *= 2
    return p


def block(x: int) -> int:
    """Block side for an extent of ``x``: a power of two in ``16 .. BLOCK_CAP``."""
    return min(max(16, BLOCK_CAP), pow2(x))


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
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(length, 1024)))


def chunking(length: int, splits: int, block: int) -> tuple[int, int]:
    """(chunk, splits): chunks of whole blocks covering ``length``, and how many there really are."""
    chunk = triton.cdiv(triton.cdiv(length, splits), block) * block
    return chunk, triton.cdiv(length, chunk)


def _device_fn(fn):
    """``triton.jit`` for compiled kernels (where helpers are inlined). Under the interpreter every
    nested ``@jit`` call re-patches ``triton.language`` (~10 ms a call), so there the helpers stay plain
    Python, which runs fine inside an interpreted kernel whose ``tl`` is already patched."""
    return fn if interpreter_requested() else triton.jit(fn)


@_device_fn
def load_rows(ptr, rows, cols, width, row_ok, col_ok):
    """``[R, C]`` block with element ``(r, c) = ptr[rows[r] * width + cols[c]]``, 0 outside the masks."""
    mask = row_ok[:, None] & col_ok[None, :]
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)


@_device_fn
def load_cols(ptr, rows, cols, width, row_ok, col_ok):
    """Transposed block ``[C, R]`` with element ``(c, r) = ptr[rows[r] * width + cols[c]]``."""
    mask = row_ok[None, :] & col_ok[:, None]
    return tl.load(ptr + rows[None, :] * width + cols[:, None], mask=mask, other=0.0)


@_device_fn
def store_rows(ptr, rows, cols, width, row_ok, col_ok, value):
    """Store ``value`` ``[R, C]`` at ``ptr[rows[r] * width + cols[c]]`` inside the masks."""
    tl.store(ptr + rows[:, None] * width + cols[None, :], value, mask=row_ok[:, None] & col_ok[None, :])


@_device_fn
def add_rows(ptr, rows, cols, width, row_ok, col_ok, value):
    """Atomically add ``value`` ``[R, C]`` at ``ptr[rows[r] * width + cols[c]]`` inside the masks."""
    tl.atomic_add(ptr + rows[:, None] * width + cols[None, :], value, mask=row_ok[:, None] & col_ok[None, :])


_chosen: dict[tuple, dict[str, int]] = {}


def _fallbacks(meta: dict[str, Any], loop_blocks: tuple[str, ...]) -> list[dict[str, int]]:
    tries: list[dict[str, int]] = [{}, {"num_stages": 1}]
    halved = {name: meta[name] // 2 for name in loop_blocks if meta.get(name, 0) >= 32}
    if halved:
        tries.append({"num_stages": 1, **halved})
    return tries


def launch(kernel, grid: tuple[int, ...], args: dict[str, Any], meta: dict[str, Any], loop_blocks=()) -> None:
    """``kernel[grid](**args, **meta)``, retrying lighter configurations on ``OutOfResources``.

    ``args`` are the tensors (``None`` for an absent one) and sizes; ``meta`` the compile-time
    constants and launch options, which alone decide whether a configuration fits.
    """
    key = (kernel, tuple(sorted((k, str(v)) for k, v in meta.items())))
    if key in _chosen:
        kernel[grid](**args, **{**meta, **_chosen[key]})
        return
    tries = _fallbacks(meta, tuple(loop_blocks))
    for i, extra in enumerate(tries):
        try:
            kernel[grid](**args, **{**meta, **extra})
        except OutOfResources:
            if i == len(tries) - 1:
                raise
            continue
        _chosen[key] = extra
        return
