"""Fashion-MNIST parsing, paths and errors, normalisation, augmentation, and the ``image`` task."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mita.data import build_dataset
from mita.data.fmnist import DEFAULT_FMNIST_DIR, MEAN, STD, read_idx

REAL = Path(DEFAULT_FMNIST_DIR) / "train-images-idx3-ubyte.gz"


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: two zero bytes, type 0x08 (ubyte), ndim, big-endian uint32 dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_root(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[split] = images, labels
    return tmp_path, data


def test_read_idx_round_trip_and_bad_files(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"abcd")  # float idx: unsupported
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match=r"header says \(10,\) = 10 bytes, file has 3"):
        read_idx(tmp_path / "c")


def test_root_env_and_normalisation(fake_root, monkeypatch):
    root, data = fake_root
    ds = build_dataset("fmnist", "test", root=root)
    monkeypatch.setenv("MITA_FMNIST_DIR", str(root))
    ds_env = build_dataset("fmnist", "test")
    images, labels = data["test"]
    assert len(ds) == len(ds_env) == 5 and ds.augment is False
    for i in range(5):
        x, y = ds[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[i]
        expected = (images[i].astype(np.float64) / 255.0 - MEAN) / STD
        np.testing.assert_allclose(x[0].numpy(), expected, rtol=0, atol=1e-6)
        assert ds_env[i][0].equal(x)


def test_train_augmentation_is_a_shifted_or_flipped_copy(fake_root):
    root, data = fake_root
    ds = build_dataset("fmnist", "train", root=root, size=4)
    assert ds.augment is True and len(ds) == 4
    torch.manual_seed(0)
    for i in range(4):
        img = data["train"][0][i].astype(np.float64) / 255.0
        padded = np.pad(img, 2)
        # all 25 crops of the 2-padded image, each flipped or not
        candidates = [padded[dy : dy + 28, dx : dx + 28] for dy in range(5) for dx in range(5)]
        candidates += [c[:, ::-1] for c in candidates]
        for _ in range(5):
            got = ds[i][0][0].numpy().astype(np.float64) * STD + MEAN
            assert min(np.abs(got - c).max() for c in candidates) < 1e-5
    assert not build_dataset("fmnist", "train", root=root, augment=False).augment


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*MITA_FMNIST_DIR"):
        build_dataset("fmnist", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        build_dataset("image", "test", root=tmp_path)


def test_image_task_is_padded_pixels_plus_one(fake_root):
    root, data = fake_root
    ds = build_dataset("image", "train", root=root)
    assert ds.info.seq_len == 1024 and ds.info.vocab_size == 257
    images, labels = data["train"]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.long and x.shape == (1024,) and y == labels[i]
        grid = x.reshape(32, 32)
        assert (grid[:2] == 1).all() and (grid[-2:] == 1).all() and (grid[:, :2] == 1).all()
        assert (grid[2:30, 2:30].numpy() == images[i].astype(np.int64) + 1).all()


@pytest.mark.skipif(not REAL.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_sizes_and_balance():
    for split, n in (("train", 60_000), ("test", 10_000)):
        ds = build_dataset("fmnist", split, augment=False)
        assert len(ds) == n
        assert np.bincount(ds.labels.numpy(), minlength=10).tolist() == [n // 10] * 10
    x, _ = ds[0]
    assert abs(float(x.mean())) < 1.0  # normalised scale
