"""On-disk cache of generated data sets: one ``.npz`` per (task, split, parameters), written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["cache_root", "cache_path", "cached_arrays"]


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


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # temp file in the same directory, then rename: readers never see a half-written cache
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cached_arrays(
    task: str,
    split: str,
    params: dict,
    build: Callable[[], dict[str, np.ndarray]],
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Load the arrays for ``params`` from the cache, or ``build()`` them and store them.

    An unreadable cache file (e.g. truncated by a crash of an older writer) is rebuilt, not trusted.
    """
    path = cache_path(task, split, params, cache_dir)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            pass
    arrays = build()
    try:
        _save_atomic(path, arrays)
    except OSError as e:  # a read-only cache must not stop training; the data is already in memory
        import warnings

        warnings.warn(f"could not write data cache {path}: {e}", stacklevel=2)
    return arrays
