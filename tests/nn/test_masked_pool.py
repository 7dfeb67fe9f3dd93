"""``masked_pool_1d``: landmarks of the valid tokens, read in place from heads split off a projection."""

from __future__ import annotations

import torch

from mita.nn.landmark_modes import masked_pool_1d


def _split_view(b: int, n: int, h: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """q ``[B, H, N, d]`` as ``AttentionBase.split_heads`` makes it: a view of a ``[B, N, 3 H d]`` output."""
    qkv = torch.randn(b, n, 3 * h * d, dtype=dtype)
    return qkv[..., : h * d].reshape(b, n, h, d).transpose(1, 2)


def _valid(b: int, n: int) -> torch.Tensor:
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, 7:] = False
    valid[1, :3] = False
    valid[1, 10:] = False
    return valid


def _windows(x: torch.Tensor, valid: torch.Tensor, m: int) -> torch.Tensor:
    """Known answer: window j of a row with L valid tokens averages the valid ranks
    floor(j L / m) .. ceil((j + 1) L / m) - 1."""
    b, h, _, d = x.shape
    out = torch.zeros(b, h, m, d, dtype=x.dtype)
    for i in range(b):
        idx = valid[i].nonzero().flatten()
        count = len(idx)
        for j in range(m):
            lo, hi = (j * count) // m, -((-(j + 1) * count) // m)
            out[i, :, j] = x[i][:, idx[lo:hi]].mean(1)
    return out


def test_split_view_pooled_in_place_matches_windows_and_copy():
    torch.manual_seed(0)
    x, valid = _split_view(3, 13, 2, 4), _valid(3, 13)
    got = masked_pool_1d(x, valid, 4)
    torch.testing.assert_close(got, _windows(x, valid, 4))
    torch.testing.assert_close(got, masked_pool_1d(x.contiguous(), valid, 4), rtol=1e-12, atol=1e-12)
    # gradients through the in-place read equal those of the contiguous copy
    xa, xb = x.detach().requires_grad_(), x.detach().contiguous().requires_grad_()
    g = torch.randn_like(got)
    (masked_pool_1d(xa, valid, 4) * g).sum().backward()
    (masked_pool_1d(xb, valid, 4) * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


def test_split_view_keeps_one_copy_of_the_weights_for_backward():
    # Broadcasting the [B, m, L] weights over H heads kept H copies (and copied x); reading the heads in
    # place keeps the weights once: at most B * m * L elements saved, whatever H.
    b, n, h, d, m = 2, 64, 4, 8, 8
    x = _split_view(b, n, h, d, torch.float32).detach().requires_grad_()
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masked_pool_1d(x, _valid(b, n), m)
    assert sum(saved.values()) <= b * m * n * 4
