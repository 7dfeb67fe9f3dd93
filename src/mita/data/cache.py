"""On-disk cache of generated data sets: one ``.npz`` per (task, split, parameters), written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_path

__all__ = ["cache_root", "cache_path", "cached_arrays", "check_rows"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MITA_CACHE``, else ``~/.cache/mita``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MITA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mita"


def cache_path(task: str, split: str, params: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """File name that changes whenever any generation parameter (including the format version) does."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    return cache_root(cache_dir) / f"{task}-{split}-{digest}.npz"


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # readers never see a half-written cache (mita.io: temp file in the same directory, then rename)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def check_rows(
    arrays: dict[str, np.ndarray], keys: Sequence[str], rows: Sequence[str], n: int | None = None
) -> str | None:
    """Why ``arrays`` cannot be the cached data set, or None: every name in ``keys`` present, the
    per-example arrays ``rows`` all of one length (``n`` when given)."""
    missing = [k for k in keys if k not in arrays]
    if missing:
        return f"it has no {', '.join(missing)}"
    lengths = {k: len(arrays[k]) for k in rows}
    if len(set(lengths.values())) > 1 or (n is not None and any(v != n for v in lengths.values())):
        want = f" (expected {n} each)" if n is not None else ""
        return f"its per-example arrays have lengths {lengths}{want}"
    return None


def cached_arrays(
    task: str,
    split: str,
    params: dict,
    build: Callable[[], dict[str, np.ndarray]],
    cache_dir: str | os.PathLike | None = None,
    check: Callable[[dict[str, np.ndarray]], str | None] | None = None,
) -> dict[str, np.ndarray]:
    """Load the arrays for ``params`` from the cache, or ``build()`` them and store them.

    An unreadable cache file (e.g. truncated by a crash of an older writer), or one that ``check``
    rejects (it returns why, e.g. :func:`check_rows`: a missing array, short arrays), is rebuilt with a
    warning, not trusted.
    """
    path = cache_path(task, split, params, cache_dir)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            problem = check(arrays) if check is not None else None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            problem = f"it cannot be read ({err})"
        if problem is None:
            return arrays
        warnings.warn(f"rebuilding data cache {path}: {problem}", stacklevel=2)
    arrays = build()
    try:
        _save(path, arrays)
    except OSError as e:  # a read-only cache must not stop training; the data is already in memory
        warnings.warn(f"could not write data cache {path}: {e}", stacklevel=2)
    return arrays
