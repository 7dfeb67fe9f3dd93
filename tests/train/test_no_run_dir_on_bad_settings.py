"""Settings that fail once data or model are built still leave no run directory: one line, exit 2."""

from __future__ import annotations

import pytest

from mita.train import cli

from .helpers import TINY


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "64"], "smaller than one batch of 64"),  # 48 training samples
        (["--seed", str(2**70)], "--seed"),
    ],
)
def test_bad_settings_leave_no_directory(tmp_path, capsys, cache_dir, extra, message):
    out = tmp_path / "new" / "run"
    args = TINY + extra + ["--cache-dir", cache_dir, "--out", str(out)]  # the last --batch-size counts
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mita train: error:") and message in err[0]
    assert "Overflow" not in err[0]
    assert not (tmp_path / "new").exists()


def test_img_size_with_fmnist_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "fmnist", "--preset", "tiny", "--img-size", "32", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img_size" in err[0]
    assert not out.exists()


def test_an_existing_empty_directory_is_kept_and_left_empty(tmp_path, capsys, cache_dir):
    out = tmp_path / "run"
    out.mkdir()
    args = TINY + ["--batch-size", "64", "--cache-dir", cache_dir, "--out", str(out)]
    assert cli.main(args) == 2
    assert out.is_dir() and not any(out.iterdir())
