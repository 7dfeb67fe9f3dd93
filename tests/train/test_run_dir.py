"""The run directory: one run at a time (lock), --resume needs a checkpoint, crafted state files are
refused without running their code, files are mode 0644, --max-steps beyond the run's length is reported."""

import json
import pickle

import pytest
import torch

from mita.train import cli

from .helpers import TINY


@pytest.fixture()
def args(cache_dir):
    return TINY + ["--max-steps", "2", "--cache-dir", cache_dir]


def test_a_locked_run_directory_is_refused(tmp_path, capsys, args):
    import fcntl  # noqa: PLC0415

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as fh:  # another process's run holds the lock
        fh.write("4242")
        fh.flush()
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(args + ["--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert "is in use by another mita train (pid 4242)" in err
        assert not (run / "metrics.jsonl").exists()
    assert cli.main(args + ["--out", str(run)]) == 0  # released: the run goes ahead


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys, args):
    typo = tmp_path / "rnu"
    assert cli.main(args + ["--out", str(typo), "--resume"]) == 2
    assert f"nothing to resume in {typo}" in capsys.readouterr().err
    assert not typo.exists()


class _WritesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_crafted_training_state_is_refused_without_running_it(tmp_path, capsys, args, how):
    run, marker = tmp_path / "run", tmp_path / "marker"
    assert cli.main(args + ["--out", str(run)]) == 0
    capsys.readouterr()
    state = run / "checkpoints" / "step-00000002.pt"
    payload = {"step": 2, "optimizer": _WritesAFile(marker)}
    if how == "torch.save":
        torch.save(payload, state)
    else:
        state.write_bytes(pickle.dumps(payload, protocol=2))
    summary = (run / "summary.json").read_text()
    assert cli.main(args + ["--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mita train: error: refusing to load") and str(state) in err
    assert len(err.splitlines()) == 1
    assert not marker.exists()  # the pickled code never ran
    assert (run / "summary.json").read_text() == summary


def test_run_files_are_0644(tmp_path, args):
    run = tmp_path / "run"
    assert cli.main(args + ["--out", str(run)]) == 0
    files = [run / "model.safetensors", run / "summary.json", run / "config.json"]
    files += sorted((run / "checkpoints").iterdir())
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}


def test_max_steps_beyond_the_run_is_reported(tmp_path, capsys, cache_dir):
    run = tmp_path / "run"
    # one epoch is 6 steps; --max-steps only shortens a run
    args = TINY + ["--epochs", "1", "--max-steps", "500", "--cache-dir", cache_dir, "--out", str(run)]
    assert cli.main(args) == 0
    assert "--max-steps 500 is more than this run's 6 steps" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
