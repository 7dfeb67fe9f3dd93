"""Exact resume: a run killed hard after step 5 (last checkpoint at step 4) and resumed ends with the same
weights and the same loss curve as an uninterrupted run, with no step logged twice."""

import json

import torch

from mita.train import cli
from mita.train.loop import KILL_ENV

from .helpers import TINY, run_mita

# 10 steps over 6-step epochs (crosses an epoch boundary), dropout on so the RNG state matters.
ARGS = TINY + ["--max-steps", "10", "--log-every", "1", "--save-every", "2", "--eval-every", "5",
               "--model-arg", "dropout=0.2"]  # fmt: skip


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    from safetensors.torch import load_file  # noqa: PLC0415

    return load_file(str(path))


def test_killed_then_resumed_equals_straight(tmp_path, cache_dir):
    args = ARGS + ["--cache-dir", cache_dir]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = run_mita(args + ["--out", str(straight)])
    assert res.returncode == 0, res.stderr

    res = run_mita(args + ["--out", str(killed)], env={KILL_ENV: "5"})
    assert res.returncode == 137, res.stderr
    assert json.loads((killed / "checkpoints" / "latest.json").read_text()) == {"step": 4}
    assert not (killed / "model.safetensors").exists()
    assert max(r["step"] for r in _records(killed)) == 5  # step 5 was logged, then lost with the kill

    res = run_mita(args + ["--out", str(killed), "--resume"])
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr and "at step 4/10" in res.stderr

    a, b = _records(straight), _records(killed)
    steps = [r["step"] for r in b if r["event"] == "train"]
    assert steps == list(range(1, 11))  # nothing repeated, nothing skipped
    for ra, rb in zip(a, b):
        assert (ra["event"], ra["step"]) == (rb["event"], rb["step"])
        for key in ("loss", "acc", "lr", "test_accuracy"):
            assert ra.get(key) == rb.get(key), (ra, rb)
    assert len(a) == len(b)

    wa, wb = _weights(straight / "model.safetensors"), _weights(killed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["steps"] == sb["steps"] == 10
    assert sa["test_accuracy"] == sb["test_accuracy"]
    assert sa["best_test_accuracy"] == sb["best_test_accuracy"]


def test_resuming_a_finished_run_changes_nothing(tmp_path, cache_dir, capsys):
    out = tmp_path / "done"
    args = TINY + ["--max-steps", "3", "--cache-dir", cache_dir, "--out", str(out)]
    assert cli.main(args) == 0  # in-process: no kill needed here
    before = _weights(out / "model.safetensors")
    lines = (out / "metrics.jsonl").read_text()
    summary = (out / "summary.json").read_text()
    capsys.readouterr()
    assert cli.main(args + ["--resume"]) == 0
    assert "is a finished run (step 3/3); nothing to do" in capsys.readouterr().err
    after = _weights(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "metrics.jsonl").read_text() == lines
    assert (out / "summary.json").read_text() == summary  # not re-measured by the resuming process
    # killed after its last checkpoint but before its summary: the figures come back from the checkpoint
    (out / "summary.json").unlink()
    assert cli.main(args + ["--resume"]) == 0
    old, new = json.loads(summary), json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "best_test_accuracy", "test_loss", "eval_samples_per_s", "train_time_s"):
        assert new[key] == old[key], key
    assert (out / "metrics.jsonl").read_text() == lines
