"""Landmark builders against windows written out by hand (SPEC §2.1)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mita.landmarks import official_pool, pool_1d, pool_2d


def _window_means_1d(x: torch.Tensor, m: int) -> torch.Tensor:
    n = x.shape[-2]
    rows = [x[..., (j * n) // m : math.ceil((j + 1) * n / m), :].mean(-2) for j in range(m)]
    return torch.stack(rows, -2)


@pytest.mark.parametrize("n, m", [(16, 4), (17, 5), (7, 7), (10, 1), (197, 25)])
def test_pool_1d_is_mean_of_uniform_windows(n, m):
    x = torch.randn(2, 3, n, 4, dtype=torch.float64)
    torch.testing.assert_close(pool_1d(x, m), _window_means_1d(x, m))


def test_pool_1d_before_or_after_head_split_agree():
    x = torch.randn(2, 20, 12, dtype=torch.float64)  # [B, N, C], C = 3 heads x 4
    before = pool_1d(x, 5).reshape(2, 5, 3, 4).transpose(1, 2)
    after = pool_1d(x.reshape(2, 20, 3, 4).transpose(1, 2), 5)
    torch.testing.assert_close(before, after)


def _grid_means(tokens: torch.Tensor, h: int, w: int, mh: int, mw: int) -> torch.Tensor:
    grid = tokens.reshape(*tokens.shape[:-2], h, w, tokens.shape[-1])
    out = []
    for i in range(mh):
        for j in range(mw):
            rows = slice((i * h) // mh, math.ceil((i + 1) * h / mh))
            cols = slice((j * w) // mw, math.ceil((j + 1) * w / mw))
            out.append(grid[..., rows, cols, :].mean((-3, -2)))
    return torch.stack(out, -2)


@pytest.mark.parametrize(
    "h, w, mh, mw, prefix, suffix", [(14, 14, 5, 5, 1, 0), (6, 8, 3, 2, 0, 0), (4, 4, 4, 4, 1, 4)]
)
def test_pool_2d_pools_patch_grid_only(h, w, mh, mw, prefix, suffix):
    x = torch.randn(2, 2, prefix + h * w + suffix, 3, dtype=torch.float64)
    got = pool_2d(x, grid=(h, w), size=(mh, mw), prefix=prefix, suffix=suffix)
    torch.testing.assert_close(got, _grid_means(x[..., prefix : prefix + h * w, :], h, w, mh, mw))


def test_official_pool_includes_cls_and_drops_last_patch():
    x = torch.randn(1, 2, 197, 4, dtype=torch.float64)
    got = official_pool(x, 5)
    torch.testing.assert_close(got, _grid_means(x[..., :196, :], 14, 14, 5, 5))
    # It differs from the default layout, which leaves cls out and pools every patch.
    assert not torch.allclose(got, pool_2d(x, (14, 14), 5, prefix=1))


def test_errors_name_sizes():
    x = torch.randn(1, 20, 4)
    with pytest.raises(ValueError, match=r"m=21 must be in 1..N=20"):
        pool_1d(x, 21)
    with pytest.raises(ValueError, match=r"N=20 must equal prefix \(1\) \+ h\*w \(4x4=16\)"):
        pool_2d(x, (4, 4), 2, prefix=1)
    with pytest.raises(ValueError, match=r"landmark grid 5x5 is larger than the token grid 4x4"):
        pool_2d(x[:, :16], (4, 4), 5)
    with pytest.raises(ValueError, match=r"official_pool: needs N = side\*side \+ 1"):
        official_pool(x, 2)


def test_pooling_heads_split_off_a_projection_reads_them_in_place():
    """[B, H, N, d] views of a [B, N, H*d] projection (and prefix slices of them) pool to the same values
    and gradients as contiguous copies."""
    proj = torch.randn(2, 17, 2 * 3 * 4, dtype=torch.float64, requires_grad=True)
    for heads, pool in itertools.product(
        (
            proj[..., :12].view(2, 17, 3, 4).transpose(1, 2),
            proj.view(2, 17, 2, 3, 4).permute(2, 0, 3, 1, 4)[1],
        ),
        (lambda x: pool_1d(x[:, :, 1:], 5), lambda x: pool_2d(x, (4, 4), 3, prefix=1)),
    ):
        copy = heads.detach().contiguous().requires_grad_()
        got, want = pool(heads), pool(copy)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        w = torch.randn_like(want)
        (g,) = torch.autograd.grad((got * w).sum(), proj)
        (e,) = torch.autograd.grad((want * w).sum(), copy)
        (g_heads,) = torch.autograd.grad((pool(heads) * w).sum(), heads)
        torch.testing.assert_close(g_heads, e, atol=1e-12, rtol=0)
        assert g.abs().sum() > 0


def test_masked_pool_2d_averages_the_valid_tokens_of_each_window():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1 + 16, 4, dtype=torch.float64)  # cls + a 4 x 4 grid
    valid = torch.ones(2, 17, dtype=torch.bool)
    torch.testing.assert_close(pool_2d(x, (4, 4), 2, prefix=1, valid=valid), pool_2d(x, (4, 4), 2, prefix=1))
    valid[0, [1, 2, 5]] = False  # three of window (0, 0)'s four tokens (grid 0, 1, 4)
    valid[1, [1, 2, 5, 6]] = False  # all of window (0, 0)
    got = pool_2d(x, (4, 4), 2, prefix=1, valid=valid)
    torch.testing.assert_close(got[0, :, 0], x[0, :, 6])  # the one valid token left
    assert torch.equal(got[1, :, 0], torch.zeros_like(got[1, :, 0]))  # no valid token: zeros
    torch.testing.assert_close(got[:, :, 1:], pool_2d(x, (4, 4), 2, prefix=1)[:, :, 1:])
    # official: windows over cls + patches, the padded cls left out
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[:, 0] = False
    want = official_pool(x, 2)
    got = official_pool(x, 2, valid)
    torch.testing.assert_close(got[:, :, 1:], want[:, :, 1:])
    torch.testing.assert_close(got[:, :, 0], x[:, :, [1, 4, 5]].mean(2))
