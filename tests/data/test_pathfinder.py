"""Pathfinder: labels checked by pixel connectivity of the gap-free rendering, balance, determinism."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from mita.data import build_dataset
from mita.data.pathfinder import CHUNK, DIFFICULTIES, PathfinderConfig, generate_pathfinder


def connected(mask: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Breadth-first search over 8-connected True pixels from ``a``; True if it reaches ``b``."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    queue = deque([a])
    seen[a] = True
    while queue:
        y, x = queue.popleft()
        if (y, x) == b:
            return True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                v, u = y + dy, x + dx
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    queue.append((v, u))
    return False


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_label_is_connectivity_of_the_dots(difficulty):
    # main paths and distractors never touch (placement rule), so in the gap-free rendering the dots are
    # pixel-connected exactly when one path joins them
    images, labels, full, dots = generate_pathfinder(60, 1, "val", DIFFICULTIES[difficulty], return_full=True)
    for img, y, f, d in zip(images, labels, full, dots):
        a, b = tuple(int(v) for v in d[0]), tuple(int(v) for v in d[1])
        assert f[a] and f[b] and img[a] == 255 and img[b] == 255
        assert connected(f, a, b) == bool(y)
        assert ((img > 0) <= f).all()  # the dashed image draws a subset of the full paths


def test_dashes_leave_gaps_and_dots_are_3x3():
    images, labels, full, dots = generate_pathfinder(50, 0, "test", return_full=True)
    drawn, solid = (images > 0).sum(axis=(1, 2)), full.sum(axis=(1, 2))
    assert (drawn < solid).all()  # every image has gaps in its paths
    for img, d in zip(images, dots):
        for y, x in d:
            assert (img[y - 1 : y + 2, x - 1 : x + 2] == 255).all()
    assert set(np.unique(images)) <= {0, 255}


def test_balanced_deterministic_prefix():
    cfg = DIFFICULTIES["easy"]
    im1, lb1 = generate_pathfinder(CHUNK + 10, 5, "train", cfg)
    assert lb1[:CHUNK].sum() == CHUNK // 2  # each chunk is exactly balanced
    im2, lb2 = generate_pathfinder(10, 5, "train", cfg)
    np.testing.assert_array_equal(im1[:10], im2)
    np.testing.assert_array_equal(lb1[:10], lb2)
    im3, _ = generate_pathfinder(10, 5, "val", cfg)
    assert not (im3 == im2).all()


def test_dataset_tokens(tmp_path):
    ds = build_dataset("pathfinder", "train", size=40, difficulty="medium", cache_dir=tmp_path)
    images, labels = generate_pathfinder(40, 0, "train", DIFFICULTIES["medium"])
    assert ds.info.seq_len == 1024 and ds.info.vocab_size == 257 and ds.info.image_size == (32, 32)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.long and x.shape == (1024,)
        assert x.min() >= 1 and x.max() <= 256  # token = pixel + 1, never padding
        assert (x - 1).reshape(32, 32).numpy().tolist() == images[i].tolist() and y == labels[i]


def test_config_validation():
    with pytest.raises(ValueError, match="multiples"):
        PathfinderConfig(dash=1.2)
    with pytest.raises(ValueError, match="bad Pathfinder config"):
        PathfinderConfig(paddles=0)
    with pytest.raises(ValueError, match="need n >= 1"):
        generate_pathfinder(0, 0, "train")
    with pytest.raises(ValueError, match="no room for two main paths"):
        generate_pathfinder(2, 0, "train", PathfinderConfig(size=8, paddles=40, tries=2))


def test_dot_distance_is_a_weak_cue():
    # negatives take the pair of ends whose distance best matches a positive's, so a threshold on the
    # distance between the dots (the obvious shortcut) stays near chance on the default difficulty
    _, labels, _, dots = generate_pathfinder(2000, 2, "train", return_full=True)
    dist = np.linalg.norm(dots[:, 0] - dots[:, 1], axis=1)
    best = max(max(((dist < t) == labels).mean(), ((dist >= t) == labels).mean()) for t in np.unique(dist))
    assert best < 0.6
