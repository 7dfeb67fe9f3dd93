"""Small builders shared by the op tests."""

from __future__ import annotations

import torch


def make_inputs(
    b: int = 2,
    h: int = 2,
    hkv: int | None = None,
    n: int = 24,
    d: int = 8,
    m: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [B,H,N,d], k/v [B,Hkv,N,d] and independent landmarks [B,H,m,d] (all leaves)."""
    g = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    return rnd(b, h, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d), rnd(b, h, m, d)


def padding_mask(b: int, n: int, pad_last: list[int]) -> torch.Tensor:
    """[B, N] bool mask with the last ``pad_last[i]`` keys of row i marked as padding."""
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, p in enumerate(pad_last):
        if p:
            mask[i, n - p :] = True
    return mask
