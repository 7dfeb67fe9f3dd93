"""Checks of scalar options shared by the op and the modules: each raises ValueError naming the argument.

Integers may be any ``numbers.Integral`` (numpy's included) but not bools; flags must be real bools (a
string such as ``"no"`` is truthy); scales must be finite and positive (``inf`` gives all-NaN outputs).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np


def as_int(name: str, value: Any, low: int = 1, high: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``low..high`` (``high`` None: no upper bound)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    n = operator.index(value) if ok else None
    if n is None or n < low or (high is not None and n > high):
        bound = f"in {low}..{what or high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value if n is None else n!r}")
    return n


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; only ``True``/``False`` (and numpy bools) are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def as_scale(name: str, value: Any) -> float | None:
    """``None``, or a finite positive real number as a float."""
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a positive number (finite) or None, got {value!r}")
    return float(value)
