"""Metrics: when a run logs, evaluates and saves; the window's means; strict JSON lines; resume truncation."""

import json
import math
from pathlib import Path

import pytest
import torch

from mita.train.distributed import DistInfo
from mita.train.errors import Diverged
from mita.train.metrics import Metrics
from mita.train.state import RunState


def _metrics(tmp_path: Path, **kw) -> Metrics:
    settings = dict(steps_per_epoch=6, total_steps=14, log_every=4, eval_every=None, save_every=5)
    settings.update(kw)
    return Metrics(tmp_path, dist=DistInfo(), device=torch.device("cpu"), **settings)


def test_intervals_include_epoch_ends_and_the_last_step(tmp_path):
    m = _metrics(tmp_path)
    steps = range(1, 15)
    assert [s for s in steps if m.should_log(s)] == [4, 6, 8, 12, 14]
    assert [s for s in steps if m.should_eval(s)] == [6, 12, 14]  # None: once per epoch
    assert [s for s in steps if m.should_save(s)] == [5, 6, 10, 12, 14]


def test_window_means_and_strict_json(tmp_path):
    m = _metrics(tmp_path)
    # two steps: 3 targets at mean loss 2.0 (2 right), 1 target at loss 6.0 (1 right)
    m.add(torch.tensor(2.0), torch.tensor(2), torch.tensor(3), samples=3)
    m.add(torch.tensor(6.0), torch.tensor(1), torch.tensor(1), samples=1)
    state = RunState(step=2, train_time_s=1.5)
    m.log_train(state, lr=0.1, seconds=2.0)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["loss"] == pytest.approx(3.0) and record["acc"] == pytest.approx(0.75)
    assert record["samples_per_s"] == pytest.approx(2.0) and record["step"] == 2
    m.add(torch.tensor(1.0), torch.tensor(0), torch.tensor(1), samples=1)
    m.log_train(RunState(step=3), lr=0.1, seconds=0.0)  # no time measured: samples/s unknown
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"samples_per_s": null' in last and "NaN" not in last


def test_a_non_finite_loss_stops_the_run(tmp_path):
    m = _metrics(tmp_path)
    m.add(torch.tensor(1.0), torch.tensor(1), torch.tensor(1), samples=1)
    m.ensure_finite(1)  # fine
    m.add(torch.tensor(math.inf), torch.tensor(1), torch.tensor(1), samples=1)
    with pytest.raises(Diverged, match="not finite at step 2"):
        m.ensure_finite(2)
    m.add(torch.tensor(math.nan), torch.tensor(1), torch.tensor(1), samples=1)
    with pytest.raises(Diverged, match="nan at step 3"):
        m.log_train(RunState(step=3), lr=0.1, seconds=1.0)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] is None


def test_truncate_keeps_records_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "train", "step": s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"event": "tra')  # killed mid-line
    _metrics(tmp_path).truncate(2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
