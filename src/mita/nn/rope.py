"""Rotary position embeddings for token grids (2-D axial) and sequences (1-D), SPEC §2.2 (ViT-5 style).

Channel pairs ``(2i, 2i+1)`` of each head are rotated by ``angle = pos * theta^(-2i/d_axis)``. In 2-D the
first half of the head channels encodes the row and the second half the column (axial RoPE), so
``rot(q, p) . rot(k, p')`` depends on ``p - p'`` only.
"""

from __future__ import annotations

import torch


def rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """``dim // 2`` inverse frequencies ``theta^(-2i/dim)`` (float64, moved/cast by the caller)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"rotary dimension must be a positive even number, got {dim}")
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``[L, head_dim // 2]`` for ``positions`` ``[L, A]`` (A = 1 axis or 2 axes).

    Each axis gets ``head_dim // A`` channels; ``head_dim`` must be divisible by ``2 * A``.
    """
    if positions.dim() != 2 or positions.shape[1] not in (1, 2):
        raise ValueError(f"positions must be [L, 1] or [L, 2], got {tuple(positions.shape)}")
    axes = positions.shape[1]
    if head_dim % (2 * axes):
        raise ValueError(f"RoPE over {axes} axes needs head_dim divisible by {2 * axes}, got {head_dim}")
    freqs = rope_frequencies(head_dim // axes, theta).to(positions.device)
    parts = [positions[:, a : a + 1].double() * freqs for a in range(axes)]
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotate tokens ``start .. start + L - 1`` of ``x`` ``[..., N, d]`` by ``angles`` ``[L, d // 2]``.

    Tokens outside that range (prefix tokens such as cls, trailing registers) are returned unchanged.
    """
    length = angles.shape[0]
    if start < 0 or start + length > x.shape[-2] or 2 * angles.shape[1] != x.shape[-1]:
        raise ValueError(
            f"apply_rope: angles {tuple(angles.shape)} at offset {start} do not fit x {tuple(x.shape)}"
        )
    cos = angles.cos().to(x.dtype)
    sin = angles.sin().to(x.dtype)
    seg = x[..., start : start + length, :]
    even, odd = seg[..., 0::2], seg[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :start, :], rotated, x[..., start + length :, :]), dim=-2)


def grid_positions(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Raster-order ``(row, col)`` positions ``[h*w, 2]``."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack((rows, cols), dim=1)
