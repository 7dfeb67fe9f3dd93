"""Checks shared by the ops (non-causal and causal), their caches and the modules: each raises ValueError
naming the argument.

Integers may be any ``numbers.Integral`` (numpy's included) but not bools; flags must be real bools (a
string such as ``"no"`` is truthy); scales must be finite and positive (``inf`` gives all-NaN outputs).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np
import torch


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


def as_weight(name: str, value: Any) -> float:
    """A loss weight: a finite real number ``>= 0``, as a float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok or not 0 <= float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def as_experts(shared: Any, routed: Any) -> tuple[bool, bool]:
    """``shared`` and ``routed`` as bools; at least one expert must stay on."""
    shared, routed = as_bool("shared", shared), as_bool("routed", routed)
    if not shared and not routed:
        raise ValueError("shared=False and routed=False leaves no expert to attend to; enable at least one")
    return shared, routed


#: Causal MiTA's landmark horizons (SPEC §5.2): keys before the query's block, or up to the end of the
#: landmark's own block.
HORIZONS = ("prefix", "frozen")


def as_horizon(value: Any) -> str:
    """``value`` as one of :data:`HORIZONS`."""
    if not isinstance(value, str) or value not in HORIZONS:
        raise ValueError(f"landmark_horizon must be 'prefix' or 'frozen', got {value!r}")
    return value


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_attention_tensors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor
) -> None:
    """The tensor checks every form of the op makes: 4-D floating tensors of one dtype and device, with
    consistent batch, heads (GQA), head and value dims and non-empty sequences."""
    named = {"q": q, "k": k, "v": v, "landmarks": landmarks}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, heads, len, dim], got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in named.items():
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; all inputs must match")
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device"
            )
    b, h, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {_shape(v)} must match k shape {_shape(k)} in [B, heads, len]")
    if bk != b or landmarks.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {v.shape[0]}, landmarks {landmarks.shape[0]}")
    if dk != d or landmarks.shape[3] != d:
        raise ValueError(
            f"head dims differ: q {d}, k {dk}, landmarks {landmarks.shape[3]} (q, k and landmarks must agree)"
        )
    if landmarks.shape[1] != h:
        raise ValueError(f"landmarks have {landmarks.shape[1]} heads but q has {h}")
    if hkv < 1 or h % hkv != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hkv}) for grouped-query attention")
    if nk < 1 or nq < 1 or d < 1:
        raise ValueError(f"empty inputs: q {_shape(q)}, k {_shape(k)}")
    if v.shape[3] < 1:
        raise ValueError(f"v must have a value dim dv >= 1, got shape {_shape(v)}")
