"""``torchrun --nproc_per_node=2 -m mita train``: two CPU processes on gloo, on a tiny configuration."""

import json
import shutil
import sys

import pytest

from mita.train.checkpoint import load_model

from .helpers import TINY, run_mita


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Windows is not supported here")
def test_torchrun_two_cpu_processes(tmp_path, cache_dir):
    if shutil.which("torchrun") is None:
        launcher = [sys.executable, "-m", "torch.distributed.run"]
    else:
        launcher = ["torchrun"]
    launcher += ["--standalone", "--nproc_per_node=2", "-m", "mita", "train"]
    out = tmp_path / "ddp"
    # 48 samples / 2 ranks / batch 4 -> 6 steps per epoch; global batch 8 as in the single-process runs
    args = TINY + ["--batch-size", "4", "--max-steps", "8", "--log-every", "2", "--device", "cpu",
                   "--cache-dir", cache_dir, "--out", str(out)]  # fmt: skip
    res = run_mita(args, launcher=launcher)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["recipe"]["world_size"] == 2 and summary["recipe"]["batch_size"] == 4
    assert summary["hardware"]["device"] == "cpu"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps == [2, 4, 6, 8]  # rank 0 alone writes: no duplicated lines
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records if r["event"] == "train")
    evals = [r for r in records if r["event"] == "eval"]
    assert evals[-1]["test_accuracy"] == summary["test_accuracy"]
    # test accuracy is a multiple of 1/16: both ranks' shards (8 + 8 samples) were counted once
    assert (summary["test_accuracy"] * 16) == pytest.approx(round(summary["test_accuracy"] * 16))
    assert res.stdout.count("summary:") == 1  # one final summary, from rank 0
    assert res.stderr.count("step 8: test accuracy") == 1  # progress lines from rank 0 only
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest.json", "step-00000008.pt", "step-00000008.safetensors"]

    model, meta = load_model(out)
    assert meta["recipe"]["world_size"] == 2
