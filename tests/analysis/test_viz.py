"""``visualize`` on toy image and sequence models: valid PNGs and a stats.json that matches the recorder."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from mita.analysis import RoutingRecorder
from mita.analysis.viz import visualize

from .toys import ToySeq, ToyViT

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def test_viz_image_model(tmp_path):
    torch.manual_seed(0)
    model = ToyViT()
    images = torch.randn(10, 1, 28, 28)
    data = TensorDataset(images, torch.zeros(10, dtype=torch.long))
    report = visualize(model, data, tmp_path, samples=2, stats_samples=10, batch_size=4)
    for name in ("pruning_maps.png", "expert_maps.png", "layer_curves.png"):
        assert_png(tmp_path / name)
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["layout"]["grid"] == [7, 7] and saved["samples_for_stats"] == 10
    assert [layer["name"] for layer in saved["layers"]] == ["blocks.0", "blocks.1"]
    # the saved statistics are those of the recorded routing of the same 10 inputs
    with RoutingRecorder(model) as rec:
        rec.run([images])
    for got, want in zip(saved["layers"], rec.stats()):
        assert got["pruned"] == pytest.approx(want.pruned)
        assert got["iou_mean"] == pytest.approx(want.iou_mean)
        assert got["prefix_tokens"] == 1 and got["num_tokens"] == 50
    assert report["files"][-1] == "stats.json"


def test_viz_sequence_model_counts_padding_out(tmp_path):
    torch.manual_seed(1)
    model = ToySeq()
    tokens = torch.randint(1, 16, (6, 24))
    tokens[:, 20:] = 0  # the last 4 positions are padding
    data = TensorDataset(tokens, torch.zeros(6, dtype=torch.long))
    visualize(model, data, tmp_path, samples=3, stats_samples=6, batch_size=6, experts=2)
    for name in ("pruning_maps.png", "expert_maps.png", "layer_curves.png"):
        assert_png(tmp_path / name)
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert len(saved["layers"]) == 3 and saved["layout"]["layout"] == "seq"
    pad = tokens == 0
    with RoutingRecorder(model) as rec:
        rec.run([tokens])
    for got, want in zip(saved["layers"], rec.stats(padding_mask=pad)):
        assert got["pruned"] == pytest.approx(want.pruned)
        assert got["load_mean"] == pytest.approx(20 / 3)  # 20 real queries over 3 experts


def test_viz_rejects_bad_options(tmp_path):
    data = TensorDataset(torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="head=5"):
        visualize(ToyViT(), data, tmp_path, samples=1, stats_samples=2, head=5)
    with pytest.raises(ValueError, match="samples"):
        visualize(ToyViT(), data, tmp_path, samples=0)


def test_viz_draws_experts_without_windows(tmp_path):
    # layers that report non-pooled landmarks (learned/random/conv) get expert maps without a window
    torch.manual_seed(2)
    model = ToySeq()
    for block in model.blocks:
        block.landmark_mode = "learned"
    data = TensorDataset(torch.randint(1, 16, (2, 24)), torch.zeros(2, dtype=torch.long))
    visualize(model, data, tmp_path, samples=1, stats_samples=2)
    assert_png(tmp_path / "expert_maps.png")
    assert json.loads((tmp_path / "stats.json").read_text())["layout"]["landmark_mode"] == "learned"
