"""Block loads by row index, shared by the kernels (rows may be any gathered list of indices)."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _device(fn):
    """``triton.jit`` for compiled kernels (where helpers are inlined). Under the interpreter every
    nested ``@jit`` call re-patches ``triton.language`` (~10 ms a call), so there the helpers stay plain
    Python, which runs fine inside an interpreted kernel whose ``tl`` is already patched."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        return fn
    return triton.jit(fn)


@_device
def load_rows(ptr, rows, cols, width, row_ok, col_ok):
    """``[R, C]`` block with element ``(r, c) = ptr[rows[r] * width + cols[c]]``, 0 outside the masks."""
    mask = row_ok[:, None] & col_ok[None, :]
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)


@_device
def load_cols(ptr, rows, cols, width, row_ok, col_ok):
    """Transposed block ``[C, R]`` with element ``(c, r) = ptr[rows[r] * width + cols[c]]``."""
    mask = row_ok[None, :] & col_ok[:, None]
    return tl.load(ptr + rows[None, :] * width + cols[:, None], mask=mask, other=0.0)


@_device
def store_rows(ptr, rows, cols, width, row_ok, col_ok, value):
    """Store ``value`` ``[R, C]`` at ``ptr[rows[r] * width + cols[c]]`` inside the masks."""
    tl.store(ptr + rows[:, None] * width + cols[None, :], value, mask=row_ok[:, None] & col_ok[None, :])


@_device
def add_rows(ptr, rows, cols, width, row_ok, col_ok, value):
    """Atomically add ``value`` ``[R, C]`` at ``ptr[rows[r] * width + cols[c]]`` inside the masks."""
    tl.atomic_add(ptr + rows[:, None] * width + cols[None, :], value, mask=row_ok[:, None] & col_ok[None, :])
