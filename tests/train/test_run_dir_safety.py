"""The run directory never costs the user a file: a directory that is not a mita run is refused, a
``.lock`` or probe link is never followed, and a file mita did not write is never truncated."""

from __future__ import annotations

import os
import shutil

import pytest

from mita.train import cli, setup
from mita.train.config import TrainConfig

from .helpers import TINY


@pytest.fixture()
def args(cache_dir):
    return TINY + ["--max-steps", "2", "--cache-dir", cache_dir]


@pytest.mark.parametrize("names", [["config.json", "summary.json"], ["notes.txt"], ["src/"]])
def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys, args, names):
    out = tmp_path / "project"
    out.mkdir()
    for name in names:
        if name.endswith("/"):
            (out / name).mkdir()
        else:
            (out / name).write_text('{"mine": true}')
    before = {p.name: (p.read_text() if p.is_file() else None) for p in out.iterdir()}
    assert cli.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty and holds no mita run" in err
    assert {p.name: (p.read_text() if p.is_file() else None) for p in out.iterdir()} == before


def test_an_empty_directory_and_an_unfinished_run_are_accepted(tmp_path, args):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli.main(args + ["--out", str(out)]) == 0
    # a run stopped before its first checkpoint: its own files, no checkpoint; starts over
    (out / "checkpoints" / "latest.json").unlink()
    (out / "summary.json").unlink()
    assert cli.main(args + ["--out", str(out)]) == 0


def test_a_lock_symlink_is_not_followed(tmp_path, capsys, args):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    (out / setup.LOCK).symlink_to(victim)
    assert cli.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lock" in err and len(err.strip().splitlines()) == 1
    assert victim.read_text() == "precious"


def test_a_lock_hard_link_or_foreign_file_is_not_truncated(tmp_path, capsys, args):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    os.link(victim, out / setup.LOCK)
    assert cli.main(args + ["--out", str(out)]) == 2
    assert victim.read_text() == "precious"
    (out / setup.LOCK).unlink()
    (out / setup.LOCK).write_text("not a pid: someone's notes")
    assert cli.main(args + ["--out", str(out)]) == 2
    assert (out / setup.LOCK).read_text() == "not a pid: someone's notes"
    assert "not a mita lock file" in capsys.readouterr().err


def test_the_write_probe_does_not_follow_links(tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    link = out / f".write-test-{os.getpid()}"  # the probe's name before it was made unguessable
    link.symlink_to(victim)
    setup._check_run_dir(TrainConfig(task="listops", out=str(out)))
    assert victim.read_text() == "precious" and link.is_symlink()
    # the probe itself: a fresh file, created exclusively, gone afterwards
    (out / "x").mkdir()
    assert setup._probe_writable(out / "x") is None and not any((out / "x").iterdir())


def test_a_metrics_link_is_refused(tmp_path, capsys, args):
    out, target = tmp_path / "run", tmp_path / "created-elsewhere.txt"
    assert cli.main(args + ["--out", str(out)]) == 0
    shutil.rmtree(out / "checkpoints")  # a run stopped before its first checkpoint
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(target)  # dangling: appending through it would create the target
    assert cli.main(args + ["--out", str(out)]) == 2
    assert "is a link" in capsys.readouterr().err
    assert not target.exists()
