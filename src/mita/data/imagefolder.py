"""``--task imagefolder``: your own images in the usual class-per-folder layout.

Layout of ``DIR`` (``--data-root``)::

    DIR/train/<class>/*.png|*.jpg|*.jpeg
    DIR/val/<class>/...        (split "val"; split "test" reads DIR/test when it exists, else DIR/val)

Class names are the sub-folder names, sorted; train and val must have the same set. Images may have any
size and mode: they are converted to RGB, or to grayscale when every image of every split is grayscale
(``channels=`` forces 1 or 3), so the channel count depends on the data, the same for all splits. Train
images get the standard augmentation (random resized crop, scale 0.08-1, aspect 3/4-4/3, and a
horizontal flip); evaluation resizes the shorter side to ``img_size / crop_pct`` and takes the centre
``img_size`` square. Pixels are normalised with ImageNet's mean and std (what timm's ViTs were trained
with; their average for grayscale). Random draws use torch's global RNG, so seeding torch (and the
DataLoader workers) fixes the augmentation.

Decoding needs Pillow (``pip install pillow`` or ``pip install 'mita[images]'``), checked before any work.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .tasks import TaskInfo

__all__ = [
    "EXTENSIONS",
    "FolderScan",
    "ImageFolder",
    "ImageFolderError",
    "ImageFolderInfo",
    "build_imagefolder",
    "folder_info",
    "folder_info_for",
    "scan_folder",
]

EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (sum(RGB_MEAN) / 3,), (sum(RGB_STD) / 3,)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_SCALE, _RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


class ImageFolderError(ValueError):
    """The image folder is not usable: missing split, empty class, unreadable image, other class sets."""


@dataclass(frozen=True)
class ImageFolderInfo(TaskInfo):
    """:class:`TaskInfo` of an image folder (data-dependent), with the class names (in label order)."""

    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FolderScan:
    """Classes and ``(path, label)`` samples of every split present, and the channel count of the data."""

    root: Path
    classes: tuple[str, ...]
    samples: dict[str, tuple[tuple[str, int], ...]]
    channels: int


def _pil():
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            "--task imagefolder decodes images with Pillow, which is not installed: pip install pillow "
            "(or pip install 'mita[images]')"
        ) from err
    return Image


def _list_split(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(f.name for f in split_dir.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
    if loose:
        raise ImageFolderError(
            f"{split_dir} holds images outside class folders ({', '.join(loose[:3])}); the layout is "
            f"{split_dir}/<class>/<image>"
        )
    if not classes:
        raise ImageFolderError(f"{split_dir} has no class folders; the layout is {split_dir}/<class>/<image>")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(
            str(f)
            for f in (split_dir / name).rglob("*")
            if f.is_file() and f.suffix.lower() in EXTENSIONS and not f.name.startswith(".")
        )
        if not files:
            raise ImageFolderError(
                f"class folder {split_dir / name} holds no images ({'/'.join(EXTENSIONS)}); remove it or add "
                "images"
            )
        samples.extend((f, label) for f in files)
    return classes, samples


def _is_gray(image_cls, path: str) -> bool:
    """Opens the header only (no decoding); ImageFolderError naming the file when it is not an image."""
    try:
        with image_cls.open(path) as img:
            return img.mode in _GRAY_MODES
    except Exception as err:  # PIL.UnidentifiedImageError, OSError for truncated headers, ...
        raise ImageFolderError(f"cannot read image {path}: {err}") from err


_SCANS: dict[tuple[str, int], FolderScan] = {}


def scan_folder(root: str | os.PathLike, *, progress: bool = False) -> FolderScan:
    """Check the layout of ``root`` and list its samples (cached per root while its folders are unchanged).

    Every image's header is opened once, so an unreadable file is reported (by name) before training
    starts, and the channel count (1 when all images are grayscale, else 3) covers all splits.
    """
    image_cls = _pil()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (the layout is DIR/train/<class>/...)")
    present = [s for s in SPLITS if (root / s).is_dir()]
    for need in ("train", "val"):
        if need not in present:
            raise FileNotFoundError(
                f"image folder {root} has no {need}/ directory (expected {root}/train/<class>/... and "
                f"{root}/val/<class>/...)"
            )
    # folder mtimes change when files are added, removed or renamed: a changed folder is scanned again
    dirs = [root / s for s in present] + [d for s in present for d in (root / s).iterdir() if d.is_dir()]
    stamp = max(d.stat().st_mtime_ns for d in dirs)
    key = (str(root.resolve()), stamp)
    if key in _SCANS:
        return _SCANS[key]
    per_split = {s: _list_split(root / s) for s in present}
    classes = per_split["train"][0]
    for split in present[1:]:
        other = per_split[split][0]
        if other != classes:
            only_train = sorted(set(classes) - set(other))
            only_other = sorted(set(other) - set(classes))
            raise ImageFolderError(
                f"the class folders of {root}/train and {root}/{split} differ: only in train: "
                f"{only_train or 'none'}; only in {split}: {only_other or 'none'}"
            )

    all_files = [f for s in present for f, _ in per_split[s][1]]
    gray = True
    for f in tqdm(all_files, desc="checking images", disable=not progress or len(all_files) < 2000):
        gray &= _is_gray(image_cls, f)
    scan = FolderScan(
        root=root,
        classes=tuple(classes),
        samples={s: tuple(per_split[s][1]) for s in present},
        channels=1 if gray else 3,
    )
    _SCANS[key] = scan
    return scan


def _check_size(img_size: Any) -> int:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    return img_size


def folder_info(root: str | os.PathLike, img_size: int = 224, channels: int | None = None) -> ImageFolderInfo:
    """The task description of the image folder ``root`` resized to ``img_size`` (scans the folder)."""
    scan = scan_folder(root)
    return _info(scan, _check_size(img_size), _channels(scan, channels))


def _channels(scan: FolderScan, channels: int | None) -> int:
    if channels is None:
        return scan.channels
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None (from the data), got {channels!r}")
    return channels


def _info(scan: FolderScan, img_size: int, channels: int) -> ImageFolderInfo:
    return ImageFolderInfo(
        name="imagefolder",
        kind="image",
        num_classes=len(scan.classes),
        vocab_size=None,
        seq_len=None,
        image_size=(img_size, img_size),
        channels=channels,
        class_names=scan.classes,
    )


class ImageFolder(Dataset):
    """``(x float [C, img_size, img_size] normalised, label)`` of one split of an image folder.

    Args:
        root: the folder holding ``train/`` and ``val/`` (and optionally ``test/``).
        split: ``"train"``, ``"val"``, or ``"test"`` (``test/`` when present, else ``val/``).
        img_size: output side in pixels.
        channels: 1 or 3 to force grayscale / RGB; None: from the data (see the module docstring).
        augment: random resized crop + flip; default ``split == "train"``. Otherwise the centre crop.
        size: keep only ``size`` samples, a fixed draw (seed 0) over all classes, in folder order.
        crop_pct: evaluation crops the centre ``crop_pct`` of the shorter side (timm's 0.875).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        img_size: int = 224,
        *,
        channels: int | None = None,
        augment: bool | None = None,
        size: int | None = None,
        crop_pct: float = 0.875,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"image folders have splits {', '.join(SPLITS)}; got {split!r}")
        if not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        self.img_size = _check_size(img_size)
        scan = scan_folder(root)
        self._image = _pil()
        split_used = split if split in scan.samples else "val"
        samples = scan.samples[split_used]
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"size must be a positive int or None, got {size!r}")
            keep = np.sort(np.random.default_rng(0).permutation(len(samples))[:size])
            samples = tuple(samples[i] for i in keep)
        self.samples, self.split = samples, split_used
        self.channels = _channels(scan, channels)
        self.augment = split == "train" if augment is None else bool(augment)
        self.crop_pct = float(crop_pct)
        self.classes = scan.classes
        self.info = _info(scan, self.img_size, self.channels)
        mean, std = (GRAY_MEAN, GRAY_STD) if self.channels == 1 else (RGB_MEAN, RGB_STD)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str):
        try:
            with self._image.open(path) as img:
                return img.convert("L" if self.channels == 1 else "RGB")  # decodes fully
        except Exception as err:
            raise ImageFolderError(f"cannot decode image {path}: {err}") from err

    def _train_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """A random crop of 8-100 % of the area with aspect ratio in [3/4, 4/3] (10 tries, then centre)."""
        area = w * h
        log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(*_SCALE))
            ratio = math.exp(float(torch.empty(()).uniform_(log_lo, log_hi)))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if 0 < cw <= w and 0 < ch <= h:
                left = float(torch.rand(())) * (w - cw)
                top = float(torch.rand(())) * (h - ch)
                return left, top, left + cw, top + ch
        ratio = min(max(w / h, _RATIO[0]), _RATIO[1])  # fallback: the centre, clamped aspect
        cw, ch = (w, w / ratio) if w / h < ratio else (h * ratio, h)
        return (w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2

    def _eval_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """Resize-shorter-side then centre-crop, as one box in the original image's coordinates."""
        side = min(w, h) * self.crop_pct
        return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = self._load(path)
        box = self._train_box(*img.size) if self.augment else self._eval_box(*img.size)
        s = self.img_size
        img = img.resize((s, s), resample=self._image.Resampling.BICUBIC, box=box)
        arr = np.asarray(img, dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).float().div_(255.0)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return ((x - self.mean) / self.std).contiguous(), label


def build_imagefolder(
    split: str,
    *,
    root: str | os.PathLike | None,
    img_size: int | None = None,
    channels: int | None = None,
    augment: bool | None = None,
    size: int | None = None,
    crop_pct: float | None = None,
) -> ImageFolder:
    """:func:`mita.data.build_dataset`'s ``imagefolder`` task (``root`` is required; ``img_size`` 224)."""
    if root is None:
        raise ValueError(
            "--task imagefolder needs --data-root DIR (holding DIR/train/<class>/ and DIR/val/<class>/)"
        )
    return ImageFolder(
        root, split, 224 if img_size is None else img_size, channels=channels, augment=augment, size=size,
        crop_pct=0.875 if crop_pct is None else crop_pct,
    )  # fmt: skip


def folder_info_for(root: str | os.PathLike | None, data_kwargs: dict[str, Any]) -> ImageFolderInfo:
    """The task description a run with these data settings will see (scans the folder: errors early)."""
    if root is None:
        raise ValueError(
            "--task imagefolder needs --data-root DIR (holding DIR/train/<class>/ and DIR/val/<class>/)"
        )
    return folder_info(root, data_kwargs.get("img_size") or 224, data_kwargs.get("channels"))
