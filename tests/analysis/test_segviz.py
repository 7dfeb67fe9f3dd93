"""``mita viz`` and ``mita eval`` on a segmentation checkpoint (MiTA in the encoder and the decoder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mita.analysis import eval_cli, viz
from mita.data.fmnist import DEFAULT_FMNIST_DIR
from mita.train import cli

pytest.importorskip("matplotlib")
pytestmark = [
    pytest.mark.slow,  # trains a tiny segmenter for 4 steps (~15 s of CPU)
    pytest.mark.skipif(
        not (Path(DEFAULT_FMNIST_DIR) / "t10k-images-idx3-ubyte.gz").exists(),
        reason="Debian package dataset-fashion-mnist not installed",
    ),
]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "run"
    argv = [
        "--task", "fmnist-seg", "--attention", "mita", "--num-landmarks", "16", "--topk", "8",
        "--model-arg", "decoder_attention=mita", "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
        "--data-arg", "canvas=32", "--data-arg", "scale=[0.8,1.1]", "--max-steps", "4", "--batch-size", "4",
        "--train-size", "16", "--test-size", "8", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_viz_draws_scenes_and_encoder_expert_maps(seg_run, tmp_path, capsys):
    out = tmp_path / "viz"
    argv = ["--checkpoint", str(seg_run), "--out", str(out), "--samples", "2", "--test-size", "8"]
    assert viz.main(argv + ["--device", "cpu"]) == 0
    for name in ("segmentation.png", "expert_maps.png", "pruning_maps.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    stats = json.loads((out / "stats.json").read_text())
    assert stats["layout"]["grid"] == [8, 8] and stats["layout"]["prefix_tokens"] == 1  # the encoder's
    assert [layer["name"] for layer in stats["layers"]] == ["blocks.0.attn", "blocks.1.attn"]
    assert "segmentation.png" in capsys.readouterr().out


def test_eval_reports_miou_also_under_another_attention(seg_run, tmp_path, capsys):
    summary = json.loads((seg_run / "summary.json").read_text())
    assert 0 <= summary["test_miou"] <= 1 and summary["test_pixel_accuracy"] == summary["test_accuracy"]
    for extra in ([], ["--attention", "full"]):
        path = tmp_path / f"eval{len(extra)}.json"
        argv = ["--checkpoint", str(seg_run), "--json", str(path), "--test-size", "8", "--device", "cpu"]
        assert eval_cli.main(argv + extra) == 0
        report = json.loads(path.read_text())
        assert report["attention"] == (extra[1] if extra else "mita") and report["n"] == 8
        assert 0 <= report["test_miou"] <= 1 and report["baseline_miou"] < 1
        assert "mIoU" in capsys.readouterr().out
    same = json.loads((tmp_path / "eval0.json").read_text())
    assert same["test_miou"] == pytest.approx(summary["test_miou"])  # the saved weights, the same scenes
