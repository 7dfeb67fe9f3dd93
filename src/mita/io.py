"""Atomic file writes, strict JSON and markdown tables: the one I/O helper used by checkpoints, caches,
training, bench and analysis.

Every file mita writes goes to a temporary name in the destination directory, is flushed to disk, and
is renamed over the destination with ``os.replace`` (atomic on POSIX): a reader, or a run killed at any
moment, sees the old file or the new one, never a torn one. JSON is strict: non-finite floats are
written as ``null`` (``json.dumps`` would write the invalid tokens ``NaN`` / ``Infinity``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_text", "write_json", "to_json", "finite_or_none", "markdown_table"]


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is fsynced, given ``mode`` and renamed over
    ``final``; on error it is deleted and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:  # flush to disk before the rename makes the file visible
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp creates owner-only files; results and caches are shared
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)
    return Path(path)


def finite_or_none(x: Any) -> Any:
    """``x`` with every non-finite float (NaN, +-inf), at any depth of dicts/lists/tuples, as ``None``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def to_json(obj: Any, *, indent: int | None = 2, default: Any = None) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as ``null``; raises on anything else unencodable
    unless ``default`` converts it)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, default=default)


def write_json(path: str | os.PathLike, obj: Any, *, default: Any = None, mode: int = 0o644) -> Path:
    """Write ``obj`` as indented strict JSON (see :func:`to_json`) to ``path`` atomically."""
    return write_text(path, to_json(obj, default=default) + "\n", mode)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table (cells converted with ``str``); ``align`` gives one character per column,
    ``l`` (``---``) or ``r`` (``---:``); default all ``l``."""
    rule = ["---:" if a == "r" else "---" for a in (align or "l" * len(headers))]
    if len(rule) != len(headers):
        raise ValueError(f"align has {len(rule)} columns, the headers {len(headers)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
