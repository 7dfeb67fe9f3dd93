"""--task imagefolder: class-per-folder images (PNG/JPEG, RGB/grayscale, any size), built on the fly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mita.data import build_dataset, get_task
from mita.train import cli
from mita.train.checkpoint import load_model, read_meta

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from mita.data.imagefolder import (  # noqa: E402
    GRAY_MEAN,
    GRAY_STD,
    RGB_MEAN,
    RGB_STD,
    ImageFolder,
    ImageFolderError,
    folder_info,
    scan_folder,
)

SIZES = [(37, 23), (50, 61), (16, 16), (91, 40)]  # odd sizes and aspect ratios (w, h)


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def make_folder(root, classes=("cat", "dog", "eel"), per_class=3, mode="RGB", splits=("train", "val")):
    """``root/split/class/i.png|jpg`` with random pixels; PNG and JPEG alternate."""
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                ext = "png" if i % 2 == 0 else "jpg"
                img = _image(mode, SIZES[(i + c) % len(SIZES)], seed=100 * s + 10 * c + i)
                img.save(root / split / name / f"{i}.{ext}")
    return root


def test_rgb_folder_classes_labels_shapes(tmp_path):
    root = make_folder(tmp_path)
    train = ImageFolder(root, "train", img_size=12)
    val = ImageFolder(root, "val", img_size=12)
    assert train.classes == ("cat", "dog", "eel") and len(train) == len(val) == 9
    assert train.augment and not val.augment
    info = train.info
    assert (info.name, info.kind, info.num_classes, info.image_size, info.channels) == (
        "imagefolder", "image", 3, (12, 12), 3,
    )  # fmt: skip
    assert info.class_names == ("cat", "dog", "eel") and info == val.info
    labels = [val[i][1] for i in range(len(val))]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for ds in (train, val):
        x, _ = ds[4]
        assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert folder_info(root, 12) == info
    # the 'test' split reads val/ when there is no test/
    assert ImageFolder(root, "test", img_size=12).samples == val.samples


def test_grayscale_folder_has_one_channel_and_one_rgb_image_makes_all_rgb(tmp_path):
    root = make_folder(tmp_path / "g", mode="L")
    ds = ImageFolder(root, "val", img_size=8)
    assert ds.info.channels == 1 and ds[0][0].shape == (1, 8, 8)
    assert ImageFolder(root, "val", img_size=8, channels=3)[0][0].shape == (3, 8, 8)
    _image("RGB", (20, 20), 0).save(root / "val" / "dog" / "rgb.png")  # one colour image anywhere
    for split in ("train", "val"):  # -> every split converts to RGB, consistently
        d = ImageFolder(root, split, img_size=8)
        assert d.info.channels == 3 and d[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolder(root, "val", img_size=8, channels=2)


def test_eval_centre_crop_known_answer(tmp_path):
    """A white square on black covering more than the centre crop -> the crop is all white."""
    root = make_folder(tmp_path, classes=("a",), per_class=1)
    arr = np.zeros((40, 60, 3), dtype=np.uint8)  # h 40, w 60: the crop is the centre 20x20 (crop_pct 0.5)
    arr[6:34, 16:44] = 255  # white on rows 6..33, columns 16..43: the crop box 20..40 x 10..30 lies inside
    arr[:, :5] = 128
    Image.fromarray(arr).save(root / "val" / "a" / "0.png")
    x, _ = ImageFolder(root, "val", img_size=16, crop_pct=0.5)[0]
    white = (1.0 - torch.tensor(RGB_MEAN)) / torch.tensor(RGB_STD)
    torch.testing.assert_close(x, white.view(3, 1, 1).expand(3, 16, 16), atol=1e-2, rtol=0)
    gray = ImageFolder(root, "val", img_size=16, crop_pct=0.5, channels=1)[0][0]
    torch.testing.assert_close(
        gray, torch.full((1, 16, 16), (1.0 - GRAY_MEAN[0]) / GRAY_STD[0]), atol=1e-2, rtol=0
    )
    full = ImageFolder(root, "val", img_size=60, crop_pct=1.0)[0][0]  # no crop: the black border is kept
    assert full[:, 0, 0].max() < 0


def test_train_augmentation_is_seeded_and_varies(tmp_path):
    root = make_folder(tmp_path)
    ds = ImageFolder(root, "train", img_size=10)
    torch.manual_seed(1)
    a = ds[2][0]
    torch.manual_seed(1)
    b = ds[2][0]
    assert torch.equal(a, b)
    draws = [ds[2][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    val = ImageFolder(root, "val", img_size=10)
    assert torch.equal(val[2][0], val[2][0])  # evaluation is deterministic


def test_size_subset_spans_classes(tmp_path):
    root = make_folder(tmp_path, per_class=4)
    sub = ImageFolder(root, "train", img_size=8, size=6)
    assert len(sub) == 6 and len({y for _, y in sub.samples}) > 1
    assert sub.samples == ImageFolder(root, "train", img_size=8, size=6).samples  # a fixed draw


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "fox").mkdir()
    (root / "train" / "fox" / "notes.txt").write_text("not an image")
    with pytest.raises(ImageFolderError, match=r"train/fox holds no images"):
        scan_folder(root)


def test_mismatched_class_sets(tmp_path):
    root = make_folder(tmp_path)
    make_folder(root, classes=("owl",), splits=("val",))
    with pytest.raises(ImageFolderError, match=r"only in train: none; only in val: \['owl'\]"):
        ImageFolder(root, "train", img_size=8)


def test_unreadable_and_truncated_images_are_named(tmp_path):
    root = make_folder(tmp_path / "bad")
    (root / "val" / "cat" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ImageFolderError, match=r"cannot read image .*val/cat/broken\.png"):
        ImageFolder(root, "train", img_size=8)
    root = make_folder(tmp_path / "cut")
    good = (root / "val" / "dog" / "0.png").read_bytes()
    (root / "val" / "dog" / "0.png").write_bytes(good[: len(good) // 2])  # header fine, data cut
    ds = ImageFolder(root, "val", img_size=8)  # the header scan passes...
    with pytest.raises(ImageFolderError, match=r"cannot decode image .*val/dog/0\.png"):
        ds[3]  # ...decoding names the file


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    root = make_folder(tmp_path / "noval", splits=("train",))
    with pytest.raises(FileNotFoundError, match="no val/ directory"):
        scan_folder(root)
    root = make_folder(tmp_path / "loose")
    _image("RGB", (8, 8), 0).save(root / "train" / "stray.png")
    with pytest.raises(ImageFolderError, match="outside class folders"):
        scan_folder(root)
    with pytest.raises(ValueError, match="img_size must be a positive int"):
        ImageFolder(make_folder(tmp_path / "ok"), "train", img_size=0)
    with pytest.raises(ValueError, match="splits"):
        ImageFolder(tmp_path / "ok", "dev", img_size=8)


def test_build_dataset_task(tmp_path):
    root = make_folder(tmp_path)
    ds = build_dataset("imagefolder", "train", root=root, img_size=8, augment=False, size=4)
    assert isinstance(ds, ImageFolder) and len(ds) == 4 and not ds.augment and ds[0][0].shape == (3, 8, 8)
    assert get_task("imagefolder").kind == "image"  # the data-sized entry: kind only
    with pytest.raises(ValueError, match="needs --data-root"):
        build_dataset("imagefolder", "train")
    with pytest.raises(ValueError, match="only apply to 'imagefolder'"):
        build_dataset("listops", "train", img_size=8)


def test_mita_train_on_folders_and_init_from_into_other_classes_and_size(tmp_path):
    """Train on one folder, then fine-tune its weights on another (2 classes, 12 px) into MiTA."""
    base = [
        "--task",
        "imagefolder",
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--no-progress",
    ]
    first = make_folder(tmp_path / "a", per_class=4)
    r1 = tmp_path / "r1"
    assert (
        cli.main(
            base + ["--data-root", str(first), "--img-size", "8", "--attention", "full", "--out", str(r1)]
        )
        == 0
    )
    info = read_meta(r1 / "model.safetensors")["task_info"]
    assert (
        info["class_names"] == ["cat", "dog", "eel"]
        and info["channels"] == 3
        and info["image_size"] == [8, 8]
    )

    second = make_folder(tmp_path / "b", classes=("x", "y"), per_class=4)
    new = base + [
        "--data-root",
        str(second),
        "--img-size",
        "12",
        "--attention",
        "mita",
        "--init-from",
        str(r1),
    ]
    assert cli.main(new + ["--out", str(tmp_path / "r2")]) == 2  # other head and grid: refused...
    assert not (tmp_path / "r2").exists()  # ...before a run directory exists
    r3 = tmp_path / "r3"
    assert cli.main(new + ["--new-head", "--resize-pos-embed", "--out", str(r3)]) == 0
    model, meta = load_model(r3)
    assert meta["task_info"]["class_names"] == ["x", "y"] and model.head.out_features == 2
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 16) and meta["init_from"]["resized"]
    assert sorted(meta["init_from"]["new_head"]) == ["head.bias", "head.weight"]

    (second / "train" / "z").mkdir()  # an empty class folder fails before a run directory exists
    assert cli.main(new + ["--new-head", "--resize-pos-embed", "--out", str(tmp_path / "r4")]) == 2
    assert not (tmp_path / "r4").exists()
    assert cli.main(base + ["--out", str(tmp_path / "r5")]) == 2  # no --data-root
