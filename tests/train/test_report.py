"""``mita.train.report`` and ``mita.io.markdown_table``: what the results/ scripts use to launch runs and
write tables."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mita.io import markdown_table
from mita.train import report
from mita.train.distributed import DistInfo
from mita.train.metrics import Metrics


def _fake_run(calls: list, summary: dict, returncode: int = 0):
    def run(cmd, env=None, **_):
        out = cmd[cmd.index("--out") + 1]
        calls.append((cmd, env))
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        return subprocess.CompletedProcess(cmd, returncode)

    return run


def test_run_training_caps_threads_only_when_asked(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls, {"test_accuracy": 0.5}))
    args = ["--task", "fmnist", "--out", str(tmp_path)]
    assert report.run_training(args) == {"test_accuracy": 0.5}
    assert report.run_training(args, threads=3) == {"test_accuracy": 0.5}
    (cmd0, env0), (cmd1, env1) = calls
    assert cmd0[-len(args) :] == args and cmd0[1:4] == ["-m", "mita", "train"]
    assert env0 is None  # inherits the parent's environment untouched
    assert env1["OMP_NUM_THREADS"] == "3" and env1["MKL_NUM_THREADS"] == "3"


def test_run_training_raises_on_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_run([], {}, returncode=2))
    with pytest.raises(RuntimeError, match="exit code 2"):
        report.run_training(["--out", str(tmp_path)])


def test_tables_and_percentages():
    assert report.pct(0.87345) == "87.34" and report.pct(None) == "—" and report.pct(float("nan")) == "—"
    table = markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    label = report.attention_label({"attention": "mita", "model_kwargs": {"num_landmarks": 25, "topk": 16}})
    assert label == "mita (m=25, k=16)"
    assert report.attention_label({"attention": "full", "model_kwargs": {}}) == "full"


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_all_keeps_names_and_splits_threads(monkeypatch, jobs):
    seen = []

    lines = []

    def fake(args, threads=None, *, line=None):
        seen.append(threads)
        lines.append(line)
        return {"args": list(args)}

    monkeypatch.setattr(report, "run_training", fake)
    monkeypatch.setattr(report.os, "cpu_count", lambda: 8)
    runs = {("image", "mita"): ["a"], ("image", "full"): ["b"], ("text", "mita"): ["c"]}
    out = report.run_all(runs, jobs)
    assert list(out) == list(runs) and [v["args"] for v in out.values()] == [["a"], ["b"], ["c"]]
    assert seen == ([None] * 3 if jobs == 1 else [4] * 3)
    # parallel runs draw their progress bars on lines of their own (0 .. jobs - 1)
    assert lines == [None] * 3 if jobs == 1 else set(lines) <= set(range(jobs))


def test_run_training_gives_the_progress_line(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls, {}))
    report.run_training(["--out", str(tmp_path)], 2, line=1)
    assert calls[0][1][report.PROGRESS_LINE_ENV] == "1" and calls[0][1]["OMP_NUM_THREADS"] == "2"


def test_progress_bar_on_its_line(tmp_path, monkeypatch):
    monkeypatch.setenv(report.PROGRESS_LINE_ENV, "1")
    m = Metrics(tmp_path, dist=DistInfo(), device=torch.device("cpu"), steps_per_epoch=2, total_steps=4,
                log_every=1, eval_every=None, save_every=None)  # fmt: skip
    with m.progress(0, "x", True):
        assert abs(m.bar.pos) == 1  # tqdm keeps a fixed position negated


def test_train_args_drop_unset_options_and_off_switches():
    args = report.train_args(
        {"--task": "image", "--seed": 0, "--out": Path("runs/x"), "--lr": None, "--max-steps": 5},
        {"--resume": False, "--amp": True},
    )
    assert args == ["--task", "image", "--seed", "0", "--out", "runs/x", "--max-steps", "5", "--amp"]
    assert report.train_args({"--lr": None}) == []
