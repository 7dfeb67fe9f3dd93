"""``mita viz | grid | swap`` end to end on tiny checkpoints written with the training helpers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mita.analysis.loading import eval_dataset
from mita.cli import main as mita_main
from mita.data import PAD_ID, build_dataset, get_task
from mita.data.fmnist import fmnist_dir
from mita.train.checkpoint import load_model, save_model_file
from mita.train.evaluate import evaluate
from mita.train.presets import build, get_preset, model_spec

pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LISTOPS = {"seq_len": 64}  # short ListOps sequences keep generation and evaluation instant


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def save_checkpoint(path, task, attention, *, data_kwargs, model_overrides, seed=0, **attn):
    """A randomly initialised model saved exactly as ``mita train`` saves its final weights."""
    info = get_task(task)
    if "seq_len" in data_kwargs:
        info = dataclasses.replace(info, seq_len=data_kwargs["seq_len"])
    preset = get_preset(task, "tiny" if task != "fmnist" else None)
    builder, kwargs = model_spec(preset, info, attention, attn, model_overrides)
    torch.manual_seed(seed)
    model = build(builder, kwargs)
    meta = {"task": task, "attention": attention, "model": builder, "model_kwargs": kwargs,
            "data_kwargs": data_kwargs}  # fmt: skip
    save_model_file(path / "model.safetensors", model, meta)
    return path


@pytest.fixture(scope="module")
def listops_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    data = {**LISTOPS, "cache_dir": str(base / "cache")}
    over = {"depth": 2}
    return {
        "mita": save_checkpoint(base / "mita", "listops", "mita", data_kwargs=data, model_overrides=over),
        "full": save_checkpoint(base / "full", "listops", "full", data_kwargs=data, model_overrides=over),
        "agent": save_checkpoint(base / "agent", "listops", "agent", data_kwargs=data, model_overrides=over),
    }


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    if not (fmnist_dir() / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    over = {"embed_dim": 16, "depth": 2, "num_heads": 2}
    path = tmp_path_factory.mktemp("fmnist")
    return save_checkpoint(
        path, "fmnist", "mita", data_kwargs={}, model_overrides=over, num_landmarks=4, topk=6
    )


def native_accuracy(run, n):
    model, meta = load_model(run)
    return evaluate(model, eval_dataset(meta, size=n), max_samples=n)["test_accuracy"]


def test_viz_image_checkpoint(fmnist_run, tmp_path):
    assert mita_main(["viz", "--checkpoint", str(fmnist_run), "--out", str(tmp_path), "--samples", "2",
                      "--test-size", "8"]) == 0  # fmt: skip
    for name in ("pruning_maps.png", "expert_maps.png", "layer_curves.png"):
        assert_png(tmp_path / name)
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["layout"]["grid"] == [14, 14] and report["layout"]["prefix_tokens"] == 1
    assert len(report["layers"]) == 2
    for layer in report["layers"]:
        assert (layer["num_tokens"], layer["num_landmarks"], layer["topk"]) == (197, 4, 6)
        # 4 landmarks x 6 keys reach at most 24 of the 196 patches in one head
        assert 1 - 24 / 196 - 1e-6 <= layer["pruned"] <= 1
        assert layer["load_mean"] == pytest.approx(197 / 4)
        assert 0 <= layer["iou_head_min"] <= layer["iou_mean"] <= layer["iou_head_max"] <= 1


def test_viz_sequence_checkpoint_leaves_padding_out(listops_runs, tmp_path):
    assert mita_main(["viz", "--checkpoint", str(listops_runs["mita"]), "--out", str(tmp_path),
                      "--samples", "2", "--test-size", "6"]) == 0  # fmt: skip
    for name in ("pruning_maps.png", "expert_maps.png", "layer_curves.png"):
        assert_png(tmp_path / name)
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["layout"]["layout"] == "seq" and len(report["layers"]) == 2

    data = build_dataset(
        "listops", "test", size=6, **LISTOPS, cache_dir=str(listops_runs["mita"].parent / "cache")
    )
    real = torch.stack([data[i][0] for i in range(6)]) != PAD_ID
    for layer in report["layers"]:
        # every real query goes to exactly one of the m = 4 experts; padded ones are not counted
        assert layer["load_mean"] * 4 == pytest.approx(real.sum(1).double().mean().item())


def test_grid_command(listops_runs, tmp_path):
    run = listops_runs["mita"]
    assert mita_main(["grid", "--checkpoint", str(run), "--num-landmarks", "2,4,80", "--topk", "1,4",
                      "--test-size", "16", "--out", str(tmp_path)]) == 0  # fmt: skip
    assert_png(tmp_path / "grid.png")
    report = json.loads((tmp_path / "grid.json").read_text())
    assert (report["m"], report["k"], report["n"]) == ([2, 4, 80], [1, 4], 16)
    assert (report["trained_m"], report["trained_k"]) == (4, 4)
    acc = report["accuracy"]
    assert acc[2] == [None, None] and "m=80,k=1" in report["errors"]  # 80 landmarks > 64 tokens
    assert all(0 <= a <= 1 for row in acc[:2] for a in row)
    # converting to the trained m, k must not change the model
    assert acc[1][1] == pytest.approx(native_accuracy(run, 16))


def test_grid_on_image_reports_non_square_m(fmnist_run, tmp_path):
    assert mita_main(["grid", "--checkpoint", str(fmnist_run), "--num-landmarks", "4,5", "--topk", "6",
                      "--test-size", "8", "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "grid.json").read_text())
    assert report["accuracy"][1] == [None] and "square" in report["errors"]["m=5,k=6"]
    assert report["accuracy"][0][0] == pytest.approx(native_accuracy(fmnist_run, 8))
    assert_png(tmp_path / "grid.png")


def test_swap_command(listops_runs, tmp_path):
    runs = [listops_runs[k] for k in ("full", "agent", "mita")]
    assert mita_main(["swap", "--checkpoints", *map(str, runs), "--out", str(tmp_path), "--test-size", "16",
                      "--num-landmarks", "4", "--topk", "4"]) == 0  # fmt: skip
    assert_png(tmp_path / "swap.png")
    report = json.loads((tmp_path / "swap.json").read_text())
    assert report["eval_attention"] == ["full", "agent", "mita"]
    assert [c["label"] for c in report["columns"]] == ["full", "agent", "mita"]
    acc = report["accuracy"]  # rows: evaluated with, columns: trained with
    assert all(a is not None and 0 <= a <= 1 for row in acc for a in row)
    for i, run in enumerate(runs):  # the diagonal is each checkpoint as trained
        assert acc[i][i] == pytest.approx(native_accuracy(run, 16))


def test_commands_fail_cleanly(listops_runs, tmp_path, capsys):
    assert mita_main(["viz", "--checkpoint", str(listops_runs["full"]), "--out", str(tmp_path)]) == 2
    assert "no MiTA attention layer" in capsys.readouterr().err
    assert (
        mita_main(
            [
                "grid",
                "--checkpoint",
                str(listops_runs["mita"]),
                "--num-landmarks",
                "a,b",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--num-landmarks must be a comma-separated list" in err
    assert mita_main(["swap", "--checkpoints", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert mita_main(["swap", "--checkpoints", str(listops_runs["mita"]), "--kinds", "mita,fast",
                      "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "unknown attention kind 'fast'" in capsys.readouterr().err
    run = str(listops_runs["mita"])
    for argv in (["viz", "--checkpoint", run], ["grid", "--checkpoint", run], ["swap", "--checkpoints", run]):
        assert mita_main(argv + ["--out", str(tmp_path / "o"), "--device", "foo"]) == 2
        assert "--device 'foo' is not a device" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        assert mita_main(argv + ["--out", str(blocker / "o")]) == 2  # checked before evaluating
        assert f"cannot write to {blocker / 'o'}" in capsys.readouterr().err


def test_eval_dataset_drops_training_only_options(fmnist_run):
    meta = {"task": "fmnist", "data_kwargs": {"augment": True, "size": 5}}
    data = eval_dataset(meta, size=3)
    plain = build_dataset("fmnist", "test", augment=False, size=3)
    assert len(data) == 3
    assert all(torch.equal(data[i][0], plain[i][0]) for i in range(3))  # no random crop/flip
