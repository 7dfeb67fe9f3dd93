"""Whether ``TRITON_INTERPRET`` asks for the Triton interpreter: read by the entry point (:mod:`.backend`)
and the kernel files (:mod:`.utils`). A leaf: it imports neither ``triton`` nor the rest of the package."""

from __future__ import annotations

import os


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter (the one place mita reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
