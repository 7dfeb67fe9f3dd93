"""fmnist-seg scenes (mita.data.scenes): determinism, labels agree with pixels, splits apart, bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mita.data import build_dataset, get_task, report
from mita.data.fmnist import DEFAULT_FMNIST_DIR, MEAN, STD
from mita.data.scenes import (
    INK_THRESHOLD,
    SceneConfig,
    SegmentationScenes,
    _resize,
    scene_config,
)
from mita.train import cli

REAL = __import__("pathlib").Path(DEFAULT_FMNIST_DIR) / "t10k-images-idx3-ubyte.gz"


def _pool(n: int = 40, classes=range(10), seed: int = 0):
    """Random 'items': blobs of ink with a known class each (no data files needed)."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 28, 28)) ** 2 * 255).astype(np.uint8)
    images[:, :4], images[:, -4:] = 0, 0  # a dark border, as Fashion-MNIST's
    labels = np.array([list(classes)[i % len(classes)] for i in range(n)], dtype=np.int64)
    return images, labels


SMALL = SceneConfig(64, (2, 4), (0.75, 1.5))


def _scenes(split="train", seed=0, size=8, cfg=SMALL, **pool):
    images, labels = _pool(**pool)
    return SegmentationScenes(cfg, split, seed, size, images=images, labels=labels)


def test_scenes_are_deterministic_per_seed_split_and_index():
    a, b = _scenes(seed=3), _scenes(seed=3)
    for i in (5, 0, 7):  # any order
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], a[1][1])  # scenes differ from one another
    assert not torch.equal(a[0][1], _scenes(seed=4)[0][1])  # and from one seed to another
    x, y = a[0]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    assert y.shape == (64, 64) and y.dtype == torch.long


def test_labels_are_the_last_inked_item_and_agree_with_the_picture():
    ds = _scenes(size=12)
    for i in range(len(ds)):
        picture, target, placed = ds.scene(i)
        assert ds.cfg.items[0] <= len(placed) <= ds.cfg.items[1]
        expect = np.zeros_like(target)
        for item in placed:  # redraw from the item list: later items occlude earlier ones
            ink = _resize(ds.images[item["index"]], item["side"])
            t, left, s = item["top"], item["left"], item["side"]
            assert 0 <= t and t + s <= 64 and 0 <= left and left + s <= 64
            assert 21 <= s <= 42  # 28 px x scale in [0.75, 1.5]
            expect[t : t + s, left : left + s][ink > INK_THRESHOLD] = item["class"] + 1
        np.testing.assert_array_equal(target, expect)
        np.testing.assert_array_equal(target > 0, picture > INK_THRESHOLD)  # label iff ink
        x, y = ds[i]
        np.testing.assert_allclose(x[0].numpy(), (picture - MEAN) / STD, rtol=1e-6, atol=1e-6)
        assert torch.equal(y, torch.from_numpy(target))
        assert set(np.unique(target)) <= {0} | {item["class"] + 1 for item in placed}


def test_train_and_test_scenes_come_from_their_own_split(monkeypatch):
    pools = {"train": _pool(classes=range(5)), "test": _pool(classes=range(5, 10), seed=1)}
    monkeypatch.setattr("mita.data.scenes.load_fmnist", lambda split, root=None: pools[split])
    train = build_dataset("fmnist-seg", "train", size=6, canvas=64)
    test = build_dataset("fmnist-seg", "test", size=6, canvas=64)
    train_classes = set(torch.cat([train[i][1].flatten() for i in range(6)]).tolist())
    test_classes = set(torch.cat([test[i][1].flatten() for i in range(6)]).tolist())
    assert train_classes - {0} and train_classes <= set(range(0, 6))  # classes 0..4 -> labels 1..5
    assert test_classes - {0} and test_classes <= {0} | set(range(6, 11))
    # the two splits draw from different random streams, not just different pools
    assert [p["top"] for p in train.scene(0)[2]] != [p["top"] for p in test.scene(0)[2]]
    assert train.info.kind == "segmentation" and train.info.image_size == (64, 64)


@pytest.mark.skipif(not REAL.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_scenes_have_the_paper_token_count():
    ds = build_dataset("fmnist-seg", "test", size=4)
    assert ds.info == get_task("fmnist-seg") and len(ds) == 4
    x, y = ds[0]
    assert x.shape == (1, 128, 128) and y.shape == (128, 128)  # patch 4 -> 32 x 32 = 1,024 tokens
    assert 0 < (y > 0).float().mean() < 0.9 and int(y.max()) <= 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canvas": 16}, "canvas must be an int >= 28"),
        ({"canvas": 64.5}, "canvas must be an int"),
        ({"items": [3, 2]}, "1 <= min <= max <= 64"),
        ({"items": [0, 2]}, "1 <= min <= max <= 64"),
        ({"items": [1, 2, 3]}, "items must be a pair"),
        ({"items": "2-5"}, "items must be a pair"),
        ({"scale": [2, 1]}, "0.25 <= min <= max"),
        ({"canvas": 32, "scale": [1, 2]}, "do not fit a 32 px canvas"),
    ],
)
def test_bad_scene_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scene_config(**kwargs)
    with pytest.raises(ValueError, match=message):
        build_dataset("fmnist-seg", "train", size=2, **kwargs)


def test_scene_options_belong_to_fmnist_seg_only():
    with pytest.raises(ValueError, match="only apply to 'fmnist-seg'"):
        build_dataset("mqar", "train", size=2, canvas=64)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("canvas=20", "canvas must be an int >= 28"),
        ("items=[4,1]", "items must satisfy"),
        ("sizes=3", "sizes"),
    ],
)
def test_bad_data_arg_fails_before_the_run_directory_exists(tmp_path, capsys, arg, message):
    out = tmp_path / "run"
    argv = ["--task", "fmnist-seg", "--out", str(out), "--data-arg", arg, "--max-steps", "1", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mita train: error:") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_mita_data_reports_pixel_classes_and_draws_scenes(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")

    monkeypatch.setattr("mita.data.scenes.load_fmnist", lambda split, root=None: _pool())
    row = report.task_stats("fmnist-seg", "test", size=5, canvas=64)
    ds = build_dataset("fmnist-seg", "test", size=5, canvas=64)
    expect = np.bincount(torch.stack([ds[i][1] for i in range(5)]).numpy().ravel(), minlength=11)
    assert row["n"] == 5 and row["class_counts"] == expect.tolist()
    assert row["majority"] == pytest.approx(expect[0] / expect.sum())
    path = report.render_scenes(tmp_path / "scenes.png", count=3, canvas=64)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
