"""Handing the C heap's free pages back to the system between training and evaluation (glibc only).

glibc serves the 1-32 MiB tensors of a training step from its heap (its mmap threshold grows to the
largest block freed) and keeps the pages of freed blocks: after a few dozen steps at the long-range
presets the process holds a few hundred MiB it does not use, and evaluation, with its larger batches,
then adds its own peak on top. ``malloc_trim(0)`` returns those pages; it frees nothing in use.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:  # pragma: no cover - no dynamic loader
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc has it; musl and others do not
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system (``malloc_trim(0)``); False where unavailable."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
