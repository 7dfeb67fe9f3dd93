"""A full disk while saving: one line naming the file, exit code 2, no orphan file, and --resume goes on
from the last complete checkpoint."""

from __future__ import annotations

import errno

import pytest
import torch

from mita.train import checkpoint as ck
from mita.train import cli

from .helpers import TINY


def _full_disk_on_call(monkeypatch, target, name, fail_at, exc):
    real, calls = getattr(target, name), []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == fail_at:
            with open(f, "wb") as fh:
                fh.write(b"part of a file")
            raise exc
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(target, name, save)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
    ],
)
def test_disk_full_during_a_checkpoint(tmp_path, capsys, monkeypatch, cache_dir, exc):
    out = tmp_path / "run"
    args = TINY + ["--max-steps", "4", "--save-every", "1", "--cache-dir", cache_dir, "--out", str(out)]
    with monkeypatch.context() as m:
        _full_disk_on_call(m, torch, "save", 3, exc)  # the state file of step 3
        assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mita train: error: ")
    assert "step-00000003.pt" in err[0]
    if isinstance(exc, OSError):
        assert "no space left on device writing" in err[0] and "free space and --resume" in err[0]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest.json", "step-00000002.pt", "step-00000002.safetensors"]  # no orphan
    assert cli.main(args + ["--resume"]) == 0
    assert ck.latest_step(out / "checkpoints") == 4


def test_disk_full_writing_the_final_model(tmp_path, capsys, monkeypatch, cache_dir):
    import safetensors.torch as st  # noqa: PLC0415

    out = tmp_path / "run"
    args = TINY + ["--max-steps", "2", "--cache-dir", cache_dir, "--out", str(out)]
    with monkeypatch.context() as m:
        real = st.save_model

        def save(model, filename, metadata=None):
            if "model.safetensors" in filename:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(model, filename, metadata=metadata)

        m.setattr(st, "save_model", save)
        assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no space left on device writing" in err and "model.safetensors" in err
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert cli.main(args + ["--resume"]) == 0 and (out / "summary.json").is_file()
