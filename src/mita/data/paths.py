"""Where a task's data is found on *this* machine, given the data options a checkpoint was trained with.

A checkpoint records how its data was built (``seq_len``, ``seed``, ``difficulty``...), and a data
directory only when the user chose one. Reading it back elsewhere, the lookup is: an explicit ``root``
argument, else the task's environment variable (``$MITA_FMNIST_DIR``, ``$MITA_TEXT_DIR``), else the
recorded directory if it exists here, else the data module's default. The recorded ``cache_dir`` is never
used: a checkpoint does not choose where this machine writes caches (``$MITA_CACHE`` or an explicit one).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["ROOT_ENV", "recorded_data_kwargs", "resolve_data_kwargs"]

# task -> the environment variable naming its data directory (tasks that read files only)
ROOT_ENV = {
    "fmnist": "MITA_FMNIST_DIR",
    "image": "MITA_FMNIST_DIR",
    "fmnist-seg": "MITA_FMNIST_DIR",
    "text": "MITA_TEXT_DIR",
    "retrieval": "MITA_TEXT_DIR",
}
_MACHINE_LOCAL = ("cache_dir",)  # options that describe this machine, not the data
_TRAINING_ONLY = ("size", "augment")  # the training-set cut and augmentation do not apply to evaluation


def recorded_data_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``build_dataset`` options worth storing in a checkpoint: without machine-local ones."""
    return {k: v for k, v in kwargs.items() if k not in _MACHINE_LOCAL}


def resolve_data_kwargs(
    task: str,
    recorded: dict[str, Any] | None,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``build_dataset`` keywords for evaluating ``task`` here from a checkpoint's ``recorded`` options.

    ``root`` / ``cache_dir`` are the caller's explicit choices (e.g. ``--data-root``); see the module
    docstring for the order in which a data directory is looked up. A recorded directory that does not
    exist here is dropped with a warning, so the default location is tried.
    """
    kwargs = {k: v for k, v in (recorded or {}).items() if k not in _MACHINE_LOCAL + _TRAINING_ONLY}
    stored_root = kwargs.pop("root", None)
    env = ROOT_ENV.get(task)
    if root is not None:
        kwargs["root"] = root
    elif stored_root is not None and not (env and os.environ.get(env)):
        if Path(stored_root).expanduser().exists():
            kwargs["root"] = stored_root
        else:
            where = f"${env} or the default location" if env else "the default location"
            warnings.warn(
                f"the checkpoint's data directory {stored_root} does not exist here; using {where}",
                stacklevel=2,
            )
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    return kwargs
