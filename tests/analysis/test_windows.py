"""Landmark windows match what mita.landmarks actually averages."""

from __future__ import annotations

import pytest
import torch

import mita
from mita.analysis.hooks import RoutingLayout
from mita.analysis.viz import _windows
from mita.analysis.windows import adaptive_span, landmark_grid, landmark_windows_1d, landmark_windows_2d


def test_adaptive_span_by_hand():
    # 5 items into 3 cells: floor(j*5/3) .. ceil((j+1)*5/3)-1 -> [0,1], [1,2,3], [3,4]
    assert [list(adaptive_span(j, 5, 3)) for j in range(3)] == [[0, 1], [1, 2, 3], [3, 4]]
    with pytest.raises(ValueError, match="length 2"):
        adaptive_span(0, 2, 3)


def test_windows_reproduce_the_pooling():
    # averaging one-hot rows over each window must give the landmark builders' output exactly
    n, prefix = 1 + 7 * 5, 1
    x = torch.eye(n, dtype=torch.float64)
    pooled = mita.landmarks.pool_2d(x, (7, 5), (3, 2), prefix=prefix)
    for j, win in enumerate(landmark_windows_2d((7, 5), (3, 2), prefix=prefix)):
        want = torch.zeros(n, dtype=torch.float64)
        want[win] = 1 / len(win)
        assert torch.allclose(pooled[j], want)
    pooled = mita.landmarks.pool_1d(x[prefix:], 4)
    for j, win in enumerate(landmark_windows_1d(n, 4, prefix=prefix)):
        want = torch.zeros(n, dtype=torch.float64)
        want[win] = 1 / len(win)
        assert torch.allclose(pooled[j], want)


def test_landmark_grid():
    assert landmark_grid(25, (14, 14)) == (5, 5)
    assert landmark_grid(6, (14, 14)) == (2, 3)
    with pytest.raises(ValueError, match="7 landmarks"):
        landmark_grid(7, (3, 3))


def test_viz_windows_follow_the_landmark_mode():
    def layout(kind, mode, m, grid=None, prefix=0, landmark_grid=None):
        return RoutingLayout(kind, grid, prefix, m, mode, landmark_grid)

    # "official": cls + all patches but the last, pooled as a side x side grid
    n = 1 + 4 * 4
    x = torch.eye(n, dtype=torch.float64)
    pooled = mita.landmarks.official_pool(x, (2, 2))
    wins = _windows(layout("grid", "official", 4, (4, 4), 1), n)
    for j, win in enumerate(wins):
        want = torch.zeros(n, dtype=torch.float64)
        want[win] = 1 / len(win)
        assert torch.allclose(pooled[j], want)
    # learned landmarks have no window; 1-D pooling with padding averages over the real tokens only
    assert _windows(layout("seq", "learned", 3), 10) == [[], [], []]
    pad = torch.tensor([False] * 6 + [True] * 4)
    assert _windows(layout("seq", "pool", 3), 10, pad) == [[0, 1], [2, 3], [4, 5]]
