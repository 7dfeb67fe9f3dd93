"""``--resume`` refuses settings that would change the run (one line naming them, exit 2), and accepts
those that do not (where to evaluate, logging, workers)."""

from __future__ import annotations

import pytest

from mita.train import cli

from .helpers import TINY


@pytest.fixture(scope="module")
def run_args(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("resume") / "run"
    args = TINY + ["--max-steps", "4", "--save-every", "2", "--cache-dir", cache_dir, "--out", str(out)]
    assert cli.main(args) == 0
    (out / "summary.json").unlink()  # as if stopped: --resume goes on from step 4's checkpoint
    return args


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--amp"], "--amp"),
        (["--data-arg", "augment=false"], "--data-arg"),
        (["--attn-only"], "--attn-only"),
        (["--test-size", "8"], "--test-size"),
        (["--topk", "3"], "--topk"),
    ],
)
def test_resume_with_other_settings_is_refused(run_args, capsys, extra, named):
    assert cli.main(run_args + extra + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume with other settings: " in err[0] and named in err[0]


def test_resume_with_harmless_changes_goes_on(run_args, capsys):
    extra = ["--log-every", "1", "--eval-batch-size", "4", "--no-progress", "--device", "cpu"]
    assert cli.main(run_args + extra + ["--resume"]) == 0


def test_the_checkpoint_settings_are_checked_too(tmp_path, capsys, cache_dir):
    out = tmp_path / "run"
    args = TINY + ["--max-steps", "4", "--save-every", "2", "--cache-dir", cache_dir, "--out", str(out)]
    assert cli.main(args) == 0
    (out / "summary.json").unlink()
    (out / "config.json").unlink()  # only the checkpoint's training state records the settings now
    assert cli.main(args + ["--amp", "--resume"]) == 2
    assert "cannot resume with other settings: --amp (was False, now True)" in capsys.readouterr().err
