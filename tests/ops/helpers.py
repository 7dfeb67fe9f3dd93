"""Small builders shared by the op tests."""

from __future__ import annotations

import pytest
import torch

from mita.ops.cpu.build import _missing_tools


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


def _cpu_kernel_tools_missing() -> bool:
    return _missing_tools() is not None


# The fused CPU backend as a test parameter: skipped only where no compiler/ninja exists (a build that
# fails with the tools present fails the test, so CI cannot silently lose the fast path).
CPU = pytest.param(
    "cpu", marks=pytest.mark.skipif(_cpu_kernel_tools_missing(), reason="no C++ compiler or ninja")
)


def same_routing(ref, got, backend: str, mask: torch.Tensor | None = None) -> bool:
    """Routing equality. The cpu backend lists each landmark's keys in increasing index order (torch.topk's
    order is unspecified), so there the key *sets* are compared, with padded picks (possible only when
    fewer than k keys are real) counted rather than named."""
    if not torch.equal(ref.expert_index, got.expert_index):
        return False
    if backend != "cpu":
        return torch.equal(ref.key_index, got.key_index)

    def canon(idx: torch.Tensor) -> torch.Tensor:
        if mask is not None:
            b, h, m, k = idx.shape
            pad = mask[:, None, None, :].expand(b, h, m, -1).gather(3, idx)
            idx = idx.masked_fill(pad, -1)
        return idx.sort(-1).values

    return torch.equal(canon(ref.key_index), canon(got.key_index))
