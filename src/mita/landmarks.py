"""Landmark builders: the m query summaries that MiTA routes with (SPEC §2.1).

All builders take ``x`` with the sequence on dimension -2 (``[..., N, d]``), so they work both on
head-split queries ``[B, H, N, d]`` and on full-channel queries ``[B, N, C]`` (average pooling is
linear, so pooling before or after the head split gives the same landmarks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["pool_1d", "pool_2d", "official_pool", "block_mean"]


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size}")
    return size  # type: ignore[return-value]


def _check_seq(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"landmark input must have shape [..., N, d], got {tuple(x.shape)}")


_WINDOW_MATRICES: dict[tuple[int, int], torch.Tensor] = {}


def _window_matrix(n: int, m: int) -> torch.Tensor:
    """``[m, n]`` float64: row ``j`` is ``1 / |window j|`` on PyTorch's adaptive window ``j``, 0 elsewhere.
    Cached in eager mode (a plain dict: under ``torch.compile`` the matrix is traced as a constant)."""
    if torch.compiler.is_compiling():
        return _windows(n, m)
    if (n, m) not in _WINDOW_MATRICES:
        _WINDOW_MATRICES[(n, m)] = _windows(n, m)
    return _WINDOW_MATRICES[(n, m)]


def _windows(n: int, m: int) -> torch.Tensor:
    starts = torch.arange(m) * n // m
    ends = -((-(torch.arange(m) + 1) * n) // m)  # ceil((j + 1) n / m)
    pos = torch.arange(n)
    inside = (pos >= starts[:, None]) & (pos < ends[:, None])
    return inside.double() / (ends - starts).double()[:, None]


def _pool_matrix(grid: tuple[int, int], size: tuple[int, int], before: int, after: int) -> torch.Tensor:
    """``[mh*mw, before + h*w + after]``: adaptive 2-D average pooling of a raster grid as one matrix.

    Adaptive pooling is separable (each window is a row range times a column range), so the matrix is
    the Kronecker product of the two 1-D window matrices, with zero columns for the unpooled tokens."""
    pool = torch.kron(_window_matrix(grid[0], size[0]), _window_matrix(grid[1], size[1]))
    return F.pad(pool, (before, after))


def rows_matmul(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weights`` ``[B, M, N]`` times the rows of ``x`` (``[B, N, C]`` or ``[B, H, N, d]``): ``[..., M, .]``.

    Heads split off a ``[B, N, ..., H*d]`` projection are read in place (one product over ``H*d``
    columns): broadcasting over ``H`` would copy ``x`` into a batch of heads and keep ``H`` copies of the
    weights for the backward.
    """
    if x.dim() == 3:
        return weights @ x
    b, h, n, d = x.shape
    if h > 1 and x.stride(1) == d and x.stride(3) == 1:
        rows = x.transpose(1, 2).reshape(b, n, h * d)  # a view under this condition
        return (weights @ rows).view(b, -1, h, d).transpose(1, 2)
    return weights[:, None] @ x  # [B, 1, M, N] @ [B, H, N, d]


def _apply_masked_pool(pool: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pool with the windows of ``pool`` (``[M, N]``) over the valid tokens only (``valid`` ``[B, N]``).

    Each window averages its valid tokens (a window without any gives zeros): a padded token gets weight
    exactly 0, so what it holds cannot change any landmark.
    """
    if x.dim() not in (3, 4) or valid.dim() != 2 or valid.shape != (x.shape[0], x.shape[-2]):
        raise ValueError(
            f"valid must be a [B, N] bool mask for x [B, N, C] or [B, H, N, d], got {tuple(valid.shape)} "
            f"for x {tuple(x.shape)}"
        )
    inside = (pool > 0).to(x.device)
    weights = (inside[None] & valid[:, None, :]).to(x.dtype)  # [B, M, N]
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
    return rows_matmul(weights, x)


def _apply_pool(pool: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # One batched product reads x in place and has a product as its backward: adaptive_avg_pool over
    # [..., N, d] needs a channels-first copy of x and a slow scatter-style backward.
    pool = pool.to(device=x.device, dtype=x.dtype)
    if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == x.shape[3] and x.stride(3) == 1:
        # heads split off a [B, N, ..., H*d, ...] projection: pool its [B, N, H*d] view directly (no copy
        # to make the heads a batch dimension)
        b, h, n, d = x.shape
        return torch.matmul(pool, x.transpose(1, 2).reshape(b, n, h * d)).view(b, -1, h, d).transpose(1, 2)
    return torch.matmul(pool, x)


def pool_1d(x: torch.Tensor, m: int) -> torch.Tensor:
    """Adaptive average pooling over the sequence: ``[..., N, d] -> [..., m, d]``.

    Window ``j`` covers tokens ``floor(j*N/m) .. ceil((j+1)*N/m) - 1`` (PyTorch's adaptive pooling).
    """
    _check_seq(x)
    n = x.shape[-2]
    if not 1 <= m <= n:
        raise ValueError(f"pool_1d: number of landmarks m={m} must be in 1..N={n}")
    if n % m == 0:  # equal windows: a view and a mean
        return x.unflatten(-2, (m, n // m)).mean(-2)
    return _apply_pool(_window_matrix(n, m), x)


def pool_2d(
    x: torch.Tensor,
    grid: tuple[int, int],
    size: int | tuple[int, int],
    prefix: int = 0,
    suffix: int = 0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adaptive 2-D average pooling of the patch grid to ``mh x mw`` landmarks.

    ``x`` is ``[..., N, d]`` with ``N = prefix + h*w + suffix``: ``prefix`` leading tokens (cls,
    registers) and ``suffix`` trailing tokens are left out of the pooling (they remain queries, keys
    and values for the attention). Returns ``[..., mh*mw, d]`` in raster order.

    ``valid`` (``[B, N]`` bool, for ``x`` ``[B, N, C]`` or ``[B, H, N, d]``): each window averages only
    its valid tokens (zeros where it has none), so padded tokens never reach a landmark.
    """
    _check_seq(x)
    h, w = _pair(grid, "grid")
    mh, mw = _pair(size, "size")
    n = x.shape[-2]
    if prefix < 0 or suffix < 0 or prefix + h * w + suffix != n:
        raise ValueError(
            f"pool_2d: N={n} must equal prefix ({prefix}) + h*w ({h}x{w}={h * w}) + suffix ({suffix})"
        )
    if mh > h or mw > w:
        raise ValueError(f"pool_2d: landmark grid {mh}x{mw} is larger than the token grid {h}x{w}")
    pool = _pool_matrix((h, w), (mh, mw), prefix, suffix)
    return _apply_pool(pool, x) if valid is None else _apply_masked_pool(pool, x, valid)


def official_pool(
    x: torch.Tensor, size: int | tuple[int, int], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Landmarks exactly as the published DeiT/Segmenter code builds them (SPEC §2.1).

    The first ``N - 1`` tokens (the cls token followed by all patches but the last) are laid out as a
    ``side x side`` grid with ``side = int(sqrt(N))`` and pooled; the last patch is never pooled.
    ``valid`` (``[B, N]`` bool): windows average their valid tokens only, as in :func:`pool_2d`.
    """
    _check_seq(x)
    mh, mw = _pair(size, "size")
    n = x.shape[-2]
    side = int(math.isqrt(n))
    if side * side != n - 1:
        raise ValueError(f"official_pool: needs N = side*side + 1 (cls + square patch grid), got N={n}")
    if mh > side or mw > side:
        raise ValueError(f"official_pool: landmark grid {mh}x{mw} is larger than the grid {side}x{side}")
    pool = _pool_matrix((side, side), (mh, mw), 0, 1)
    return _apply_pool(pool, x) if valid is None else _apply_masked_pool(pool, x, valid)


def block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Causal landmarks (SPEC §5.1): ``[..., N, d] -> [..., N // block_size, d]``, row ``j`` the mean of
    tokens ``j*b .. (j+1)*b - 1`` (complete blocks only; a trailing partial block gets no landmark).

    Row ``j`` reads only tokens ``< (j + 1) * b``, so it may serve any query in a later block.
    """
    _check_seq(x)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_mean: block_size must be a positive int, got {block_size!r}")
    *lead, n, d = x.shape
    nl = n // block_size
    return x[..., : nl * block_size, :].reshape(*lead, nl, block_size, d).mean(dim=-2)
