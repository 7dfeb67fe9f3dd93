"""Which tokens each landmark is pooled from (its "window"), to draw it next to its keys and queries.

The windows follow PyTorch's adaptive average pooling, which :mod:`mita.landmarks` uses: output cell
``j`` of ``o`` over an axis of length ``L`` covers ``floor(j*L/o) .. ceil((j+1)*L/o) - 1``.
"""

from __future__ import annotations

import math

__all__ = ["adaptive_span", "landmark_windows_1d", "landmark_windows_2d", "landmark_grid"]


def adaptive_span(j: int, length: int, out: int) -> range:
    """Indices that adaptive pooling of ``length`` items to ``out`` cells averages into cell ``j``."""
    if not 0 <= j < out or not 1 <= out <= length:
        raise ValueError(f"cell {j} of {out} over length {length}: need 0 <= j < out <= length")
    return range((j * length) // out, -((-(j + 1) * length) // out))


def landmark_windows_1d(num_tokens: int, m: int, *, prefix: int = 0) -> list[list[int]]:
    """Token positions of each of ``m`` landmarks pooled over tokens ``prefix .. num_tokens - 1``."""
    n = num_tokens - prefix
    return [[prefix + t for t in adaptive_span(j, n, m)] for j in range(m)]


def landmark_grid(m: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The ``mh x mw`` landmark grid of ``m`` landmarks over a token grid: square when ``m`` is a square,
    else the most square factorisation that fits (``ValueError`` when none fits)."""
    h, w = grid
    side = math.isqrt(m)
    if side * side == m and side <= min(h, w):
        return side, side
    for mh in range(side, 0, -1):
        if m % mh == 0 and mh <= h and m // mh <= w:
            return mh, m // mh
    raise ValueError(f"{m} landmarks do not fit a landmark grid over the {h}x{w} token grid")


def landmark_windows_2d(grid: tuple[int, int], size: tuple[int, int], *, prefix: int = 0) -> list[list[int]]:
    """Token positions (raster order, after ``prefix`` tokens) of each landmark of an ``mh x mw`` pooling."""
    h, w = grid
    mh, mw = size
    windows = []
    for i in range(mh):
        for j in range(mw):
            windows.append(
                [prefix + r * w + c for r in adaptive_span(i, h, mh) for c in adaptive_span(j, w, mw)]
            )
    return windows
