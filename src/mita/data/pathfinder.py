"""Pathfinder (Linsley et al. 2018, LRA's 32x32 version): are the two dots joined by one dashed path?

Each image holds two main paths and ``distractors`` more paths of the same length. A path is a chain of
``paddles`` straight dashes whose direction turns by up to ``max_turn`` degrees at each joint; it bounces
off the image border (mirror reflection). Paths are placed one at a time and redrawn if they would touch
a path already placed (8-neighbourhood, dots included), so a path can be followed unambiguously.
Label 1: the two dots (3x3 squares) sit on both ends of one main path; label 0: one dot on an end of
each main path. Both classes draw exactly the same objects, only the dots' placement differs.

Generation is vectorised over a chunk of images with numpy; chunk ``c`` of a split uses its own RNG
seeded by ``(seed, split, c)``, so a smaller ``size`` gives a prefix of the full data set, and each chunk
is exactly class-balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PathfinderConfig", "DIFFICULTIES", "generate_pathfinder", "SPLIT_SIZES", "CHUNK"]

SPLIT_SIZES = {"train": 160_000, "val": 20_000, "test": 20_000}  # LRA: 200k images split 80/10/10
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
CHUNK = 1000  # images per independently seeded chunk (even, so each chunk is balanced)
_STEP = 0.5  # sub-pixel sampling step along a path: consecutive samples round to 8-adjacent pixels


@dataclass(frozen=True)
class PathfinderConfig:
    """Geometry of the images; the presets in :data:`DIFFICULTIES` are the usual knob."""

    size: int = 32
    paddles: int = 14  # dashes per path (path length; LRA's Pathfinder-32 "hard" uses contour length 14)
    dash: float = 1.5  # pixels drawn per dash
    gap: float = 1.0  # pixels left blank between dashes
    max_turn: float = 30.0  # degrees of turn allowed between consecutive dashes
    distractors: int = 2  # extra paths, not touching the main ones (dropped where no room is left)
    distractor_paddles: int | None = None  # their length in dashes (None: same as the main paths)
    tries: int = 30  # redraws of one path before giving up on its image (main) or dropping it (distractor)

    def __post_init__(self) -> None:
        if self.size < 8 or self.paddles < 1 or self.dash <= 0 or self.gap < 0 or self.distractors < 0:
            raise ValueError(f"bad Pathfinder config {self}")
        if (self.dash / _STEP) % 1 or (self.gap / _STEP) % 1:
            raise ValueError(f"dash and gap must be multiples of {_STEP} pixel, got {self.dash}, {self.gap}")


# Path lengths 6/9/14 dashes as in Pathfinder's three contour lengths; distractors are shorter so that
# they still fit next to two long paths on a 32x32 canvas (see docs/data.md for how many get placed).
DIFFICULTIES: dict[str, PathfinderConfig] = {
    "easy": PathfinderConfig(paddles=6, max_turn=20.0, distractors=2, distractor_paddles=6),
    "medium": PathfinderConfig(paddles=9, max_turn=25.0, distractors=3, distractor_paddles=6),
    "hard": PathfinderConfig(paddles=14, max_turn=30.0, distractors=3, distractor_paddles=7),
}

_BLOCK = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])  # 3x3 dot / dilation footprint


def _walks(
    rng: np.random.Generator, n: int, cfg: PathfinderConfig, paddles: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random paths: pixel coords ``int [n, T, 2]`` (y, x) and the dash mask ``bool [T]``."""
    per = round((cfg.dash + cfg.gap) / _STEP)
    t = paddles * per
    turns = np.deg2rad(rng.uniform(-cfg.max_turn, cfg.max_turn, (n, paddles)))
    turns[:, 0] = rng.uniform(0.0, 2.0 * np.pi, n)  # initial heading
    heading = np.repeat(np.cumsum(turns, axis=1), per, axis=1)  # [n, t]
    lo, hi = 1.0, cfg.size - 2.0  # keep 3x3 dots inside the image
    start = rng.uniform(lo, hi, (n, 1, 2))
    steps = _STEP * np.stack([np.sin(heading), np.cos(heading)], axis=-1)
    pos = np.concatenate([start, start + np.cumsum(steps, axis=1)], axis=1) - lo
    span = hi - lo
    pos = np.mod(pos, 2.0 * span)  # mirror-fold into [0, span]: a bounce off the border
    pos = np.where(pos > span, 2.0 * span - pos, pos) + lo
    return np.rint(pos).astype(np.int64), _dash_mask(t + 1, cfg)


def _dash_mask(t: int, cfg: PathfinderConfig) -> np.ndarray:
    """Which of a path's ``t`` sample points are drawn (the dashes) and which fall in gaps."""
    return (np.arange(t) % round((cfg.dash + cfg.gap) / _STEP)) < round(cfg.dash / _STEP)


def _ends_blocks(pix: np.ndarray, size: int) -> np.ndarray:
    """Pixels of 3x3 dots on both ends of each path: ``int [n, 18, 2]``."""
    ends = np.stack([pix[:, 0], pix[:, -1]], axis=1)  # [n, 2, 2]
    blocks = ends[:, :, None, :] + _BLOCK[None, None]
    return np.clip(blocks.reshape(len(pix), -1, 2), 0, size - 1)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of ``bool [n, H, W]``."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    out = np.zeros_like(mask)
    for dy, dx in _BLOCK:
        out |= p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out


def _place(rng, occupied, rows, cfg, main):
    """Draw one path for each image in ``rows`` that does not touch ``occupied``; returns (pix, ok)."""
    n = len(rows)
    paddles = cfg.paddles if main or cfg.distractor_paddles is None else cfg.distractor_paddles
    t = paddles * round((cfg.dash + cfg.gap) / _STEP) + 1
    pix = np.zeros((n, t, 2), dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    for _ in range(cfg.tries):
        todo = np.flatnonzero(~ok)
        if len(todo) == 0:
            break
        cand, _ = _walks(rng, len(todo), cfg, paddles)
        pts = np.concatenate([cand, _ends_blocks(cand, cfg.size)], axis=1) if main else cand
        hit = occupied[rows[todo][:, None], pts[..., 0], pts[..., 1]].any(axis=1)
        good = todo[~hit]
        pix[good] = cand[~hit]
        ok[good] = True
    return pix, ok


def _paint(mask: np.ndarray, rows: np.ndarray, pts: np.ndarray) -> None:
    mask[np.repeat(rows, pts.shape[1]), pts[..., 0].ravel(), pts[..., 1].ravel()] = True


def _scenes(rng: np.random.Generator, m: int, cfg: PathfinderConfig):
    """Up to ``m`` dot-less images: (dashed, gap-free, main path pixels A, B), valid rows only."""
    rows = np.arange(m)
    occupied = np.zeros((m, cfg.size, cfg.size), dtype=bool)  # dilated footprint of placed paths
    drawn = np.zeros_like(occupied)  # visible (dashed) pixels
    full = np.zeros_like(occupied)  # gap-free rendering, used by checks
    mains, valid = [], np.ones(m, dtype=bool)
    for i in range(2 + cfg.distractors):
        is_main = i < 2
        pix, ok = _place(rng, occupied, rows, cfg, main=is_main)
        dash = _dash_mask(pix.shape[1], cfg)
        if is_main:
            valid &= ok
            mains.append(pix)
        pts = np.concatenate([pix, _ends_blocks(pix, cfg.size)], axis=1) if is_main else pix
        occ = np.zeros_like(occupied)
        _paint(occ, rows[ok], pts[ok])
        occupied |= _dilate(occ)
        _paint(drawn, rows[ok], pix[ok][:, dash])
        _paint(full, rows[ok], pix[ok])
    return drawn[valid], full[valid], mains[0][valid], mains[1][valid]


def _chunk(rng: np.random.Generator, n: int, cfg: PathfinderConfig):
    """``n`` images (dashed uint8, gap-free bool) and exactly balanced labels (``n`` even)."""
    parts: list[tuple] = []
    have = 0
    while have < n:
        part = _scenes(rng, n - have, cfg)
        if len(part[0]) == 0:  # not one image had room for both main paths: retrying will not help
            raise ValueError(f"Pathfinder config {cfg} leaves no room for two main paths")
        parts.append(part)
        have += len(part[0])
    drawn, full, a, b = (np.concatenate([p[k] for p in parts]) for k in range(4))
    labels = rng.permutation(np.arange(n) % 2)
    # positive: dots on both ends of path A. negative: one end of A and one of B, the pair of ends whose
    # distance is closest to A's own end-to-end distance, so that dot distance is a weak cue to the label
    ends_a = np.stack([a[:, 0], a[:, -1]], axis=1)  # [n, 2, 2]
    ends_b = np.stack([b[:, 0], b[:, -1]], axis=1)
    target = np.linalg.norm(ends_a[:, 0] - ends_a[:, 1], axis=-1)
    cross = np.linalg.norm(ends_a[:, :, None] - ends_b[:, None, :], axis=-1).reshape(n, 4)
    pick = np.abs(cross - target[:, None]).argmin(axis=1)
    rows = np.arange(n)
    first = np.where((labels == 1)[:, None], ends_a[:, 0], ends_a[rows, pick // 2])
    second = np.where((labels == 1)[:, None], ends_a[:, 1], ends_b[rows, pick % 2])
    dots = np.stack([first, second], axis=1)  # [n, 2, 2]
    blocks = np.clip(dots[:, :, None, :] + _BLOCK[None, None], 0, cfg.size - 1).reshape(n, -1, 2)
    _paint(drawn, rows, blocks)
    _paint(full, rows, blocks)
    return (drawn.astype(np.uint8) * 255), labels.astype(np.int64), full, dots


def generate_pathfinder(
    n: int, seed: int, split: str, cfg: PathfinderConfig = DIFFICULTIES["hard"], return_full: bool = False
):
    """``n`` images ``uint8 [n, size, size]`` (0 or 255) and labels ``int64 [n]``.

    With ``return_full``, also the gap-free rendering of the same images (``bool``) and the two dot
    centres ``int [n, 2, 2]`` (y, x), which tests use to check labels by connectivity.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"Pathfinder has splits {list(_SPLIT_IDS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"Pathfinder: need n >= 1 images, got {n}")
    outs = []
    for c in range((n + CHUNK - 1) // CHUNK):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], c, 0x9A7F])
        outs.append(_chunk(rng, CHUNK, cfg))
    imgs, labels, full, dots = (np.concatenate([o[k] for o in outs])[:n] for k in range(4))
    return (imgs, labels, full, dots) if return_full else (imgs, labels)
