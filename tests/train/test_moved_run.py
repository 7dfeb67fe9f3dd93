"""A run directory moved to another machine: the checkpoint says how to find its data,
this machine says where it is (``--data-root``, ``$MITA_FMNIST_DIR``...), and caches go where this machine
puts them, never where the checkpoint was trained."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mita.analysis import eval_cli
from mita.train import cli
from mita.train.checkpoint import read_meta, resolve_model_path

from ..data.test_fmnist import write_idx
from .helpers import TINY

FMNIST = ["--task", "fmnist", "--preset", "tiny", "--train-size", "8", "--test-size", "5",
          "--batch-size", "4", "--max-steps", "1", "--no-progress"]  # fmt: skip


def fake_fmnist(root):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return root


def test_moved_fmnist_run_reads_the_data_where_this_machine_has_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MITA_FMNIST_DIR", raising=False)
    data = fake_fmnist(tmp_path / "machine-1" / "data")
    run = tmp_path / "machine-1" / "run"
    assert cli.main(FMNIST + ["--data-root", str(data), "--out", str(run)]) == 0
    assert read_meta(resolve_model_path(run))["data_kwargs"]["root"] == str(data)  # the user's choice
    moved, here = tmp_path / "machine-2" / "run", tmp_path / "machine-2" / "fashion-mnist"
    shutil.move(str(run), str(moved))
    shutil.move(str(data), str(here))  # the recorded directory no longer exists
    out = tmp_path / "eval.json"

    monkeypatch.setenv("MITA_FMNIST_DIR", str(here))  # the documented variable is honoured
    assert eval_cli.main(["--checkpoint", str(moved), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MITA_FMNIST_DIR", str(empty))  # ... even over the recorded directory
    capsys.readouterr()
    assert eval_cli.main(["--checkpoint", str(moved)]) == 2
    assert str(empty) in capsys.readouterr().err
    assert eval_cli.main(["--checkpoint", str(moved), "--data-root", str(here)]) == 0  # explicit wins

    monkeypatch.delenv("MITA_FMNIST_DIR")
    monkeypatch.setattr("mita.data.fmnist.DEFAULT_FMNIST_DIR", str(here))  # "installed" here
    with pytest.warns(UserWarning, match="data directory .* does not exist here"):
        assert eval_cli.main(["--checkpoint", str(moved)]) == 0


def test_no_data_directory_is_recorded_unless_given(tmp_path, monkeypatch):
    monkeypatch.setenv("MITA_FMNIST_DIR", str(fake_fmnist(tmp_path)))
    run = tmp_path / "run"
    assert cli.main(FMNIST + ["--out", str(run)]) == 0
    assert "root" not in read_meta(resolve_model_path(run))["data_kwargs"]


def test_a_checkpoint_does_not_choose_where_caches_are_written(tmp_path, monkeypatch):
    trained_cache = tmp_path / "machine-1" / "cache"
    run = tmp_path / "machine-1" / "run"
    assert cli.main(TINY + ["--max-steps", "1", "--cache-dir", str(trained_cache), "--out", str(run)]) == 0
    moved = tmp_path / "machine-2" / "run"
    shutil.move(str(run), str(moved))
    shutil.rmtree(trained_cache)
    here = tmp_path / "machine-2" / "cache"
    monkeypatch.setenv("MITA_CACHE", str(here))
    assert eval_cli.main(["--checkpoint", str(moved), "--test-size", "16"]) == 0
    assert not trained_cache.exists() and list(here.glob("listops-test-*.npz"))


def test_the_cache_directory_is_not_recorded(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert cli.main(TINY + ["--max-steps", "1", "--cache-dir", str(cache), "--out", str(run)]) == 0
    recorded = read_meta(resolve_model_path(run))["data_kwargs"]
    assert "cache_dir" not in recorded and recorded["seq_len"] == 64  # how to build the data is kept
