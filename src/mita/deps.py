"""Optional dependencies: check them when a command starts, not after its long work is done.

``mita`` needs only torch, numpy and tqdm; saving weights needs ``safetensors`` and every figure needs
``matplotlib``. A command that will need one calls :func:`require` before it trains or evaluates
anything, so a missing package costs a one-line error instead of an epoch.
"""

from __future__ import annotations

import importlib

__all__ = ["EXTRAS", "MissingDependency", "available", "require"]

# module -> the pip extra that installs it
EXTRAS = {
    "safetensors": "train",
    "matplotlib": "plot",
    "triton": "triton",
    "timm": "timm",
    "transformers": "hf",
}


class MissingDependency(ImportError):
    """An optional package a command needs is not installed (the message says how to install it)."""


def available(module: str) -> bool:
    """Whether optional ``module`` imports here (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(*modules: str, purpose: str) -> None:
    """Import each of ``modules`` now; :class:`MissingDependency` naming them and the install line if any
    fails (a broken install counts as missing).

    ``purpose`` finishes the sentence "... needs X", e.g. ``"mita train (to save weights)"``.
    """
    missing = [name for name in modules if not available(name)]
    if missing:
        extras = sorted({EXTRAS.get(m, m) for m in missing})
        raise MissingDependency(
            f"{purpose} needs {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)} (or pip install 'mita[{','.join(extras)}]')"
        )
