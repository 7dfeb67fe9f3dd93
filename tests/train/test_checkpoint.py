"""Checkpoint files: round trips, atomic writes (no partial file on failure), clear errors on bad files."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")

import random

import numpy as np

from mita.train import checkpoint as ck  # noqa: E402


def _net(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))


def test_model_file_round_trip(tmp_path):
    net = _net()
    meta = {"task": "fmnist", "attention": "mita", "model_kwargs": {"dim": 4}}
    path = ck.save_model_file(tmp_path / "m.safetensors", net, meta)
    assert ck.read_meta(path) == meta
    other = _net()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    ck.load_weights(other, path)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_mismatched_model_is_a_clear_error(tmp_path):
    path = ck.save_model_file(tmp_path / "m.safetensors", _net(4), {})
    with pytest.raises(ck.CheckpointError, match="cannot load weights"):  # shape mismatch
        ck.load_weights(_net(5), path)
    with pytest.raises(ck.CheckpointError, match="missing keys"):
        ck.load_weights(nn.Sequential(_net(4), nn.Linear(2, 2)), path)


def test_corrupt_and_foreign_files(tmp_path):
    path = ck.save_model_file(tmp_path / "m.safetensors", _net(), {"task": "x"})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ck.CheckpointError, match="not a readable safetensors"):
        ck.read_meta(path)
    import safetensors.torch as st  # noqa: PLC0415

    st.save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ck.CheckpointError, match="not written by mita train"):
        ck.read_meta(tmp_path / "foreign.safetensors")
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.read_meta(tmp_path / "absent.safetensors")
    with pytest.raises(ck.CheckpointError, match="neither model.safetensors"):
        ck.resolve_model_path(tmp_path)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = ck.save_model_file(tmp_path / "m.safetensors", _net(), {"version": 1})
    import safetensors.torch as st  # noqa: PLC0415

    def broken(model, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        ck.save_model_file(path, _net(), {"version": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert ck.read_meta(path) == {"version": 1}


def test_training_checkpoints_keep_only_the_latest_pair(tmp_path):
    net = _net()
    for step in (3, 6):
        state = {"epoch": step // 3, "payload": torch.ones(2) * step}
        ck.save_checkpoint(tmp_path, step, net, {"task": "t"}, state)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest.json", "step-00000006.pt", "step-00000006.safetensors"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 6}
    meta, state = ck.load_checkpoint(tmp_path, _net())
    assert meta == {"task": "t", "step": 6}
    assert state["epoch"] == 2 and torch.equal(state["payload"], torch.full((2,), 6.0))


def test_run_directory_resolution(tmp_path):
    ck.save_checkpoint(tmp_path / "checkpoints", 5, _net(), {}, {})
    assert ck.resolve_model_path(tmp_path) == tmp_path / "checkpoints" / "step-00000005.safetensors"
    ck.save_model_file(tmp_path / "model.safetensors", _net(), {})
    assert ck.resolve_model_path(tmp_path) == tmp_path / "model.safetensors"  # the final model wins


def test_torn_checkpoint_is_detected(tmp_path):
    ck.save_checkpoint(tmp_path, 4, _net(), {}, {})
    torch.save({"step": 3}, tmp_path / "step-00000004.pt")  # state from another step
    with pytest.raises(ck.CheckpointError, match="disagree"):
        ck.load_checkpoint(tmp_path, _net())
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.latest_step(tmp_path)


def test_no_checkpoint_to_resume(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path, _net())


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):

    ck.seed_all(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    torch.save({"rng": ck.rng_state()}, tmp_path / "s.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    ck.seed_all(99)
    ck.set_rng_state(ck.load_state_file(tmp_path / "s.pt")["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


class _RunsCode:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def test_a_pickled_object_in_the_state_is_refused_unexecuted(tmp_path):
    ck.save_checkpoint(tmp_path, 3, _net(), {}, {"epoch": 1})
    marker = tmp_path / "marker"
    torch.save({"step": 3, "epoch": _RunsCode(marker)}, tmp_path / "step-00000003.pt")
    net = _net(4)
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ck.CheckpointError, match="refusing to load .*step-00000003.pt") as err:
        ck.load_checkpoint(tmp_path, net)
    assert "\n" not in str(err.value) and "exec" in str(err.value)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # nothing was loaded


def test_checkpoint_files_are_readable_by_all(tmp_path):
    ck.save_checkpoint(tmp_path, 2, _net(), {}, {})
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "latest.json": 0o644, "step-00000002.pt": 0o644, "step-00000002.safetensors": 0o644
    }  # fmt: skip
