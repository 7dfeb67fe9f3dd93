"""results/segmentation.py: the commands it runs, its tables and goals from run summaries, refusing to
reuse run directories unless told to (no training here)."""

from __future__ import annotations

import pytest


def _summary(attention, miou, train_rate, img_size=128):
    return {
        "attention": attention, "test_miou": miou, "test_pixel_accuracy": 0.9,
        "train_samples_per_s": train_rate,
        "eval_samples_per_s": 3 * train_rate, "peak_memory_bytes": 2**30, "steps": 250, "num_params": 123_000,
        "baseline_miou": 0.08, "baseline_pixel_accuracy": 0.86,
        "model_kwargs": {"img_size": img_size, "patch_size": 4},
    }  # fmt: skip


def test_commands_tables_and_goals(results_script, tmp_path):
    seg = results_script("segmentation")
    args = seg.parse(["--runs", str(tmp_path), "--single-seed", "agent", "--variants", "full,mita,agent"])
    cmds = seg._commands(args, ["full", "mita", "agent"], [0, 1])
    assert set(cmds) == {
        ("quality", "full", 0), ("quality", "full", 1), ("quality", "mita", 0), ("quality", "mita", 1),
        ("quality", "agent", 0), ("speed", "full", 0), ("speed", "mita", 0), ("speed", "agent", 0),
    }  # fmt: skip
    speed = cmds[("speed", "mita", 0)]
    assert speed[speed.index("--data-arg") + 1] == "canvas=256" and speed[-2:] == ["--attention", "mita"]
    summaries = {
        ("quality", "full", 0): _summary("full", 0.40, 2.0),
        ("quality", "full", 1): _summary("full", 0.42, 2.0),
        ("quality", "mita", 0): _summary("mita", 0.405, 4.0),
        ("quality", "mita", 1): _summary("mita", 0.40, 4.0),
        ("speed", "full", 0): _summary("full", 0.0, 0.1, 256),
        ("speed", "mita", 0): _summary("mita", 0.0, 0.3, 256),
    }
    table, quality = seg.quality_table(summaries, ["full", "mita"], [0, 1])
    assert quality["full"]["miou"] == pytest.approx(0.41) and quality["mita"]["miou"] == pytest.approx(0.4025)
    assert "-0.75" in table and "40.50 / 40.00" in table and "all background" in table
    stable, speed = seg.speed_table(summaries, ["full", "mita"])
    assert speed["mita"]["tokens"] == 4096 and speed["mita"]["train_speedup_vs_full"] == pytest.approx(3.0)
    lines = seg.goals(quality, speed)
    assert any("within 1 mIoU point" in line and ": met (gap +0.75)" in line for line in lines)
    assert any("4,096 tokens: met (3.00x)" in line for line in lines)


def test_existing_runs_are_refused_before_any_training(tmp_path, monkeypatch, results_script):
    seg = results_script("segmentation")
    (tmp_path / "full-s0").mkdir()
    monkeypatch.setattr(seg, "run_all", lambda *a, **k: pytest.fail("trained despite existing runs"))
    with pytest.raises(SystemExit, match=r"full-s0 already hold runs; pass --resume"):
        seg.main(["--runs", str(tmp_path), "--variants", "full"])
    with pytest.raises(SystemExit, match="unknown variants"):
        seg.main(["--runs", str(tmp_path), "--variants", "fast"])
