"""``fmnist-seg``: semantic segmentation of scenes composed from real Fashion-MNIST items.

A scene is a ``canvas x canvas`` black image holding ``items`` Fashion-MNIST items (a random count in
``[min, max]``), each resized by a random factor in ``scale`` (bilinear, from 28 px) and placed at a
uniformly random position inside the canvas. Items are drawn in order, so later items occlude earlier
ones where they overlap. A pixel belongs to an item where the item's ink (in ``[0, 1]``) is above
:data:`INK_THRESHOLD`; only those pixels are painted, so the label map and the picture agree exactly:
``label > 0`` exactly where the raw picture is above the threshold, and there ``label = class + 1``
(0 = background, 1..10 = the Fashion-MNIST classes).

Train scenes draw their items from the training split of Fashion-MNIST, test scenes from its test split.
Scene ``i`` of a split is made from its own RNG ``(seed, split, i)``, like :mod:`mita.data.mqar`: any
scene can be made on its own, in any order; nothing is cached.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .fmnist import MEAN, STD, load_fmnist
from .tasks import TaskInfo

__all__ = [
    "SceneConfig",
    "SegmentationScenes",
    "scene_config",
    "scene_info",
    "make_scene",
    "INK_THRESHOLD",
    "NUM_SEG_CLASSES",
    "SPLIT_SIZES",
    "SEG_CLASS_NAMES",
    "CLASS_COLOURS",
]

INK_THRESHOLD = 0.2  # an item pixel with ink above this (of 1.0) belongs to the item
NUM_SEG_CLASSES = 11  # background + the 10 Fashion-MNIST classes
SEG_CLASS_NAMES = (
    "background", "T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
    "boot",
)  # fmt: skip
# background black, then matplotlib's tab10 colours for the ten classes
CLASS_COLOURS = np.array(
    [
        [0, 0, 0], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
    ],
    dtype=np.float64,
) / 255.0  # fmt: skip
SPLIT_SIZES = {"train": 20_000, "test": 1_000}
_SPLIT_IDS = {"train": 0, "test": 2}
_ITEM = 28  # side of a Fashion-MNIST item


@dataclass(frozen=True)
class SceneConfig:
    """Scene geometry: canvas side (pixels), items per scene ``(min, max)``, item scale ``(min, max)``."""

    canvas: int = 128
    items: tuple[int, int] = (2, 5)
    scale: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        c = self.canvas
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < _ITEM:
            raise ValueError(f"fmnist-seg: canvas must be an int >= {_ITEM} (pixels), got {c!r}")
        lo, hi = _pair("items", self.items)
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (lo, hi)):
            raise ValueError(f"fmnist-seg: items must be two ints [min, max], got {self.items!r}")
        if not 1 <= lo <= hi <= 64:
            raise ValueError(f"fmnist-seg: items must satisfy 1 <= min <= max <= 64, got {self.items!r}")
        slo, shi = _pair("scale", self.scale)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (slo, shi)):
            raise ValueError(f"fmnist-seg: scale must be two numbers [min, max], got {self.scale!r}")
        if not (math.isfinite(slo) and math.isfinite(shi) and 0.25 <= slo <= shi):
            raise ValueError(f"fmnist-seg: scale must satisfy 0.25 <= min <= max, got {self.scale!r}")
        if round(_ITEM * shi) > c:
            raise ValueError(
                f"fmnist-seg: items scaled by up to {shi} ({round(_ITEM * shi)} px) do not fit a {c} px "
                f"canvas; use a larger canvas or scale max <= {c / _ITEM:.2f}"
            )
        object.__setattr__(self, "canvas", int(c))
        object.__setattr__(self, "items", (int(lo), int(hi)))
        object.__setattr__(self, "scale", (float(slo), float(shi)))


def _pair(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"fmnist-seg: {name} must be a pair [min, max], got {value!r}")
    return value[0], value[1]


def scene_config(canvas=None, items=None, scale=None) -> SceneConfig:
    """A :class:`SceneConfig` from ``build_dataset`` keywords (None = the default); ValueError on bad ones.
    A single number for ``items`` or ``scale`` means ``[n, n]``."""
    kw = {}
    if canvas is not None:
        kw["canvas"] = canvas
    for name, value in (("items", items), ("scale", scale)):
        if value is not None:
            single = isinstance(value, numbers.Real) and not isinstance(value, bool)
            kw[name] = (value, value) if single else value
    return SceneConfig(**kw)


def scene_info(cfg: SceneConfig) -> TaskInfo:
    """The :class:`TaskInfo` of scenes of ``cfg``: kind ``"segmentation"``, 11 classes, its canvas."""
    return TaskInfo("fmnist-seg", "segmentation", NUM_SEG_CLASSES, None, None, (cfg.canvas, cfg.canvas), 1)


def _resize(item: np.ndarray, side: int) -> np.ndarray:
    """A ``[28, 28]`` uint8 item as float ink ``[side, side]`` in [0, 1] (bilinear)."""
    x = torch.from_numpy(item).float().div_(255.0)[None, None]
    if side != _ITEM:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=side < _ITEM)
    return x[0, 0].clamp_(0, 1).numpy()


def make_scene(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, cfg: SceneConfig
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: raw picture ``float32 [canvas, canvas]`` in [0, 1], labels ``int64 [canvas, canvas]``
    and the items placed (index into ``images``, class, top-left corner, side), in drawing order."""
    c = cfg.canvas
    picture = np.zeros((c, c), dtype=np.float32)
    target = np.zeros((c, c), dtype=np.int64)
    count = int(rng.integers(cfg.items[0], cfg.items[1] + 1))
    placed = []
    for _ in range(count):
        idx = int(rng.integers(len(images)))
        side = int(round(_ITEM * rng.uniform(cfg.scale[0], cfg.scale[1])))
        top, left = (int(v) for v in rng.integers(0, c - side + 1, size=2))
        ink = _resize(images[idx], side)
        on = ink > INK_THRESHOLD
        picture[top : top + side, left : left + side][on] = ink[on]
        target[top : top + side, left : left + side][on] = int(labels[idx]) + 1
        placed.append({"index": idx, "class": int(labels[idx]), "top": top, "left": left, "side": side})
    return picture, target, placed


class SegmentationScenes(Dataset):
    """``(x: float [1, canvas, canvas] normalised, y: long [canvas, canvas])`` scenes of one split.

    Args:
        cfg: the scene geometry.
        split: ``"train"`` (items from Fashion-MNIST's training images) or ``"test"`` (its test images).
        seed: selects the scenes; ``0`` is the canonical set.
        size: number of scenes (default :data:`SPLIT_SIZES`).
        root: the Fashion-MNIST directory (see :func:`mita.data.fmnist.load_fmnist`).
        images, labels: the item pool to draw from instead of Fashion-MNIST's split (tests).
    """

    def __init__(
        self,
        cfg: SceneConfig,
        split: str,
        seed: int = 0,
        size: int | None = None,
        root=None,
        *,
        images: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"fmnist-seg has splits {', '.join(_SPLIT_IDS)}; got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.size = SPLIT_SIZES[split] if size is None else int(size)
        if self.size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if images is None:
            images, labels = load_fmnist(split, root)
        self.images, self.labels = images, labels
        self.cfg, self.split, self.seed = cfg, split, int(seed)
        self.info = scene_info(cfg)

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """The raw scene ``i`` (see :func:`make_scene`)."""
        if not 0 <= i < self.size:
            raise IndexError(f"fmnist-seg/{self.split}: index {i} out of range 0..{self.size - 1}")
        rng = np.random.default_rng([self.seed, 31, _SPLIT_IDS[self.split], int(i)])
        return make_scene(rng, self.images, self.labels, self.cfg)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        picture, target, _ = self.scene(i)
        x = (torch.from_numpy(picture) - MEAN) / STD
        return x.unsqueeze(0), torch.from_numpy(target)
