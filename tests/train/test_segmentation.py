"""Segmentation scores (mita.train.segmentation), their place in evaluate / summary.json, a short run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mita.data import get_task
from mita.data.fmnist import DEFAULT_FMNIST_DIR
from mita.data.scenes import SceneConfig, scene_info
from mita.train.evaluate import evaluate
from mita.train.objective import hits, loss_fn, loss_sum
from mita.train.presets import get_preset, model_spec
from mita.train.segmentation import background_baseline, confusion_matrix, segmentation_scores

from .helpers import run_mita

REAL = __import__("pathlib").Path(DEFAULT_FMNIST_DIR) / "train-images-idx3-ubyte.gz"


def test_confusion_matrix_and_miou_by_hand():
    # 3 classes, 10 pixels; class 2 only ever predicted (absent from the ground truth)
    target = torch.tensor([[0, 0, 0, 0, 1], [1, 1, 0, 0, 1]])
    pred = torch.tensor([[0, 0, 1, 0, 1], [1, 2, 0, 0, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[5, 1, 0], [1, 2, 1], [0, 0, 0]]
    s = segmentation_scores(conf)
    # IoU_0 = 5 / (6 + 6 - 5) = 5/7; IoU_1 = 2 / (4 + 3 - 2) = 2/5; IoU_2 = 0 / (0 + 1 - 0) = 0
    assert s["iou"] == pytest.approx([5 / 7, 2 / 5, 0.0])
    assert s["miou"] == pytest.approx((5 / 7 + 2 / 5 + 0) / 3)
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    # a class absent from both ground truth and prediction has no IoU and stays out of the mean
    s4 = segmentation_scores(confusion_matrix(pred, target, 4))
    assert s4["iou"][3] is None and s4["miou"] == pytest.approx(s["miou"])
    # all-background: IoU_0 = 6 / 10, IoU_1 = 0 (present in the ground truth), class 2 absent
    base = background_baseline(conf)
    assert base["iou"] == pytest.approx([0.6, 0.0, None]) and base["miou"] == pytest.approx(0.3)
    assert base["pixel_accuracy"] == pytest.approx(0.6)
    # ignored targets (-100) are left out
    ignored = target.clone()
    ignored[0, 0] = -100
    assert int(confusion_matrix(pred, ignored, 3).sum()) == 9


def test_per_pixel_loss_hits_and_evaluate_report_miou():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (4, 6, 6))
    logits = torch.randn(4, 3, 6, 6)
    assert loss_fn(logits, y) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))
    assert float(loss_sum(logits, y)) == pytest.approx(float(loss_fn(logits, y)) * y.numel(), rel=1e-6)
    correct, targets = hits(logits, y)
    assert int(targets) == y.numel() and int(correct) == int((logits.argmax(1) == y).sum())

    class Fixed(torch.nn.Module):  # returns the stored logits of each sample
        def forward(self, i):
            return logits[i]

    data = [(i, y[i]) for i in range(4)]
    res = evaluate(Fixed(), data, batch_size=3)
    expect = segmentation_scores(confusion_matrix(logits.argmax(1), y, 3))
    assert res["test_miou"] == pytest.approx(expect["miou"])
    assert res["test_pixel_accuracy"] == pytest.approx(expect["pixel_accuracy"]) == res["test_accuracy"]
    assert res["baseline_pixel_accuracy"] == pytest.approx(float((y == 0).float().mean()))


@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_a_short_run_beats_the_all_background_baseline(tmp_path):
    """A 40 x 40 canvas (patch 4: 100 tokens) with one large item: MiTA learns to outline it in ~100 steps."""
    out = tmp_path / "run"
    args = [
        "--task", "fmnist-seg", "--attention", "mita", "--num-landmarks", "16", "--topk", "16",
        "--data-arg", "canvas=40", "--data-arg", "items=[1,2]", "--data-arg", "scale=[1.0,1.3]",
        "--model-arg", "embed_dim=32", "--model-arg", "depth=2", "--lr", "3e-3", "--batch-size", "16",
        "--max-steps", "120", "--train-size", "1920", "--test-size", "128", "--out", str(out),
        "--no-progress",
    ]  # fmt: skip
    proc = run_mita(args)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "test mIoU" in proc.stdout
    for key in ("test_miou", "test_pixel_accuracy", "baseline_miou", "baseline_pixel_accuracy"):
        assert math.isfinite(summary[key])
    assert summary["test_pixel_accuracy"] == summary["test_accuracy"]
    assert summary["test_miou"] > summary["baseline_miou"] + 0.03
    assert summary["test_pixel_accuracy"] > summary["baseline_pixel_accuracy"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval_segmentation" and r["test_miou"] == summary["test_miou"] for r in records)


def test_presets_build_segmenters_for_segmentation_tasks_only():
    seg = get_task("fmnist-seg")
    builder, kw = model_spec(get_preset("fmnist-seg"), seg, "mita")
    assert builder == "segmenter" and (kw["num_landmarks"], kw["topk"]) == (49, 49)
    assert (kw["num_classes"], kw["img_size"], kw["patch_size"], kw["in_chans"]) == (11, 128, 4, 1)
    builder, kw = model_spec(get_preset("fmnist-seg", "tiny"), scene_info(SceneConfig(canvas=64)), "agent")
    assert builder == "segmenter" and kw["img_size"] == 64 and kw["embed_dim"] == 16  # "auto" by task kind
    vit_anywhere = dataclasses.replace(get_preset("fmnist"), tasks=())  # a ViT classifier preset
    with pytest.raises(ValueError, match="segmentation tasks take a segmenter preset"):
        model_spec(vit_anywhere, seg, "mita")
    with pytest.raises(ValueError, match="builds segmenter but task 'fmnist' is image"):
        model_spec(dataclasses.replace(get_preset("fmnist-seg"), tasks=()), get_task("fmnist"), "mita")
