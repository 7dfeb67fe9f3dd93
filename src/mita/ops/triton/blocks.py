"""Block loads by row index, shared by the kernels (rows may be any gathered list of indices)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, rows, cols, width, row_ok, col_ok):
    """``[R, C]`` block with element ``(r, c) = ptr[rows[r] * width + cols[c]]``, 0 outside the masks."""
    mask = row_ok[:, None] & col_ok[None, :]
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_cols(ptr, rows, cols, width, row_ok, col_ok):
    """Transposed block ``[C, R]`` with element ``(c, r) = ptr[rows[r] * width + cols[c]]``."""
    mask = row_ok[None, :] & col_ok[:, None]
    return tl.load(ptr + rows[None, :] * width + cols[:, None], mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, rows, cols, width, row_ok, col_ok, value):
    """Store ``value`` ``[R, C]`` at ``ptr[rows[r] * width + cols[c]]`` inside the masks."""
    tl.store(ptr + rows[:, None] * width + cols[None, :], value, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def add_rows(ptr, rows, cols, width, row_ok, col_ok, value):
    """Atomically add ``value`` ``[R, C]`` at ``ptr[rows[r] * width + cols[c]]`` inside the masks."""
    tl.atomic_add(ptr + rows[:, None] * width + cols[None, :], value, mask=row_ok[:, None] & col_ok[None, :])
