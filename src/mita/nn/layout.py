"""Token layouts shared by the attention modules: which tokens form the patch grid or the sequence.

``"grid"``: ``prefix_tokens`` leading tokens (cls, registers), then an ``h x w`` patch grid in raster
order, then any remaining tokens (e.g. trailing registers) as a suffix. With ``grid=None`` the grid is
inferred as square from ``N - prefix_tokens``. ``"seq"``: ``prefix_tokens`` leading tokens, then a 1-D
sequence of the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LAYOUTS = ("grid", "seq")


@dataclass(frozen=True)
class TokenLayout:
    """The resolved layout of one forward: ``prefix`` + body (``grid`` or ``length`` tokens) + ``suffix``."""

    kind: str
    prefix: int
    body: int
    suffix: int
    grid: tuple[int, int] | None


def check_layout(layout: str, grid: tuple[int, int] | None, prefix_tokens: int) -> tuple[int, int] | None:
    """Validate constructor arguments; return the grid as a tuple (or None)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ValueError(f"prefix_tokens must be a non-negative int, got {prefix_tokens!r}")
    if grid is None:
        return None
    if layout != "grid":
        raise ValueError(f"grid={grid} only applies to layout='grid', got layout={layout!r}")
    g = tuple(int(s) for s in grid)
    if len(g) != 2 or min(g) < 1:
        raise ValueError(f"grid must be a pair of positive ints (h, w), got {grid}")
    return g  # type: ignore[return-value]


def resolve_layout(layout: str, grid: tuple[int, int] | None, prefix_tokens: int, n: int) -> TokenLayout:
    """Resolve the layout for a sequence of ``n`` tokens; ValueError naming the sizes if it cannot fit."""
    body = n - prefix_tokens
    if body < 1:
        raise ValueError(f"sequence of N={n} tokens has no tokens after prefix_tokens={prefix_tokens}")
    if layout == "seq":
        return TokenLayout("seq", prefix_tokens, body, 0, None)
    if grid is None:
        side = math.isqrt(body)
        if side * side != body:
            raise ValueError(
                f"cannot infer a square grid: N={n} minus prefix_tokens={prefix_tokens} is {body}, "
                "not a square number; pass grid=(h, w)"
            )
        grid = (side, side)
    h, w = grid
    if h * w > body:
        raise ValueError(f"grid {h}x{w}={h * w} does not fit N={n} tokens with prefix_tokens={prefix_tokens}")
    return TokenLayout("grid", prefix_tokens, h * w, body - h * w, (h, w))
