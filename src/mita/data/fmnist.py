"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files parsed with numpy).

Two tasks use it: ``fmnist`` (normalised float images ``[1, 28, 28]``, optional crop+flip augmentation)
and ``image`` (zero-padded to 32x32 and flattened to 1,024 pixel tokens, the grayscale-CIFAR stand-in).
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .tasks import PAD_ID, TaskInfo, get_task

__all__ = [
    "DEFAULT_FMNIST_DIR",
    "fmnist_dir",
    "read_idx",
    "load_fmnist",
    "pad_to_32",
    "FashionMNIST",
    "PixelSequences",
]

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics of Fashion-MNIST (in [0, 1])
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8}


def fmnist_dir(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$MITA_FMNIST_DIR``, else the Debian package's directory."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MITA_FMNIST_DIR", DEFAULT_FMNIST_DIR)).expanduser()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an (optionally gzipped) idx file: magic ``0 0 dtype ndim``, big-endian int32 dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    expected = math.prod(dims)
    if len(raw) - start != expected:
        raise ValueError(f"{path}: header says {dims} = {expected} bytes, file has {len(raw) - start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims).copy()


def load_fmnist(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [n, 28, 28]`` and labels ``int64 [n]`` of ``train`` (60k) or ``test`` (10k)."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', got {split!r}")
    base = fmnist_dir(root)
    paths = [base / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz files in a directory and pass root=DIR "
            "or set MITA_FMNIST_DIR=DIR."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    return images, labels.astype(np.int64)


class FashionMNIST(Dataset):
    """``(x float [1, 28, 28] normalised, label)``; with ``augment``, random crop (padding 2) + h-flip.

    Augmentation draws from torch's global RNG, so seeding torch (and DataLoader workers) fixes it.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool, info: TaskInfo | None = None):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))
        self.augment = augment
        self.info = info or get_task("fmnist")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)
        if self.augment:
            h, w = x.shape
            padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            x = padded[dy : dy + h, dx : dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - MEAN) / STD
        return x.unsqueeze(0).contiguous(), int(self.labels[i])


class PixelSequences(Dataset):
    """Grayscale images as flat token sequences: ``token = pixel + 1`` (0 stays padding)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, info: TaskInfo):
        n = len(images)
        # kept as uint8 (1 byte per pixel); shifted to token ids on access
        self.pixels = torch.from_numpy(np.ascontiguousarray(images.reshape(n, -1), dtype=np.uint8))
        if self.pixels.shape[1] != info.seq_len:
            raise ValueError(
                f"{info.name}: images give {self.pixels.shape[1]} tokens, expected {info.seq_len}"
            )
        assert PAD_ID == 0  # the +1 shift above relies on padding being 0
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        self.info = info

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.pixels[i].long() + 1, int(self.labels[i])


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """Zero-pad ``[n, 28, 28]`` images by 2 pixels on each side to ``[n, 32, 32]``."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))
