"""Stopping early: Ctrl-C saves a checkpoint at the next step and exits 130 with the resume command; a
diverged run stops with a clear error and keeps its last finite checkpoint; JSON stays strict."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from mita.train import cli
from mita.train.distributed import DistInfo
from mita.train.stop import StopSignals

from .helpers import TINY, run_mita


def _strict(line: str):
    def refuse(token):
        raise ValueError(f"invalid JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def _records(run):
    return [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigint_saves_at_the_next_step_and_resumes_exactly(tmp_path, cache_dir):
    # 8 epochs of 6 steps: long enough for the signal to land mid-run
    args = TINY + ["--epochs", "8", "--log-every", "1", "--cache-dir", cache_dir]
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
    cmd = [sys.executable, "-m", "mita", "train", *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    assert 1 <= step < 48
    assert f"SIGINT at step {step}/48: checkpoint saved" in err
    hint = err.split("resume with: ", 1)[1].splitlines()[0]
    assert shlex.split(hint) == ["mita", "train", *args, "--out", str(run), "--resume"]
    assert [r["step"] for r in _records(run) if r["event"] == "train"] == list(range(1, step + 1))
    assert not (run / "model.safetensors").exists()

    res = run_mita(args + ["--out", str(run), "--resume"])
    assert res.returncode == 0, res.stderr
    assert f"at step {step}/48" in res.stderr
    records = _records(run)
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 49))  # none lost

    straight = tmp_path / "straight"
    assert run_mita(args + ["--out", str(straight)]).returncode == 0
    from safetensors.torch import load_file  # noqa: PLC0415

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.get("loss") for r in _records(straight)] == [r.get("loss") for r in records]


def test_stop_signals_turn_a_signal_into_a_request():
    handler = signal.getsignal(signal.SIGTERM)
    with StopSignals(DistInfo(), torch.device("cpu"), check_every=5) as stop:
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(2) and stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is handler  # a second SIGTERM acts at once
        assert signal.getsignal(signal.SIGINT) == stop._handle  # a SIGINT is still a request
    assert signal.getsignal(signal.SIGTERM) is handler


def test_diverged_run_stops_with_an_error_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, cache_dir):
    run = tmp_path / "run"
    args = TINY + ["--lr", "1e10", "--max-steps", "12", "--log-every", "1", "--save-every", "1"]
    code = cli.main(args + ["--cache-dir", cache_dir, "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    assert "training diverged: the training loss is nan at step 2" in err
    assert "the last good checkpoint is step 1" in err and "--lr" in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads((run / "checkpoints" / "latest.json").read_text()) == {"step": 1}
    records = _records(run)  # strict JSON: the NaN loss is written as null
    assert [r["loss"] is None for r in records if r["event"] == "train"] == [False, True]
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    from safetensors.torch import load_file  # noqa: PLC0415

    weights = load_file(str(run / "checkpoints" / "step-00000001.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
