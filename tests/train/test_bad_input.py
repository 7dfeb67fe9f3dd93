"""Bad input to ``mita train`` / ``mita eval``: a clear one-line error, exit code 2, no partial checkpoint."""

import json

import pytest

from mita.train import cli, evaluate
from mita.train.presets import get_preset

from .helpers import TINY


def _train(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err


def test_unknown_task_and_attention_are_rejected_by_the_parser(capsys):
    for args in (["--task", "imagenet"], ["--task", "listops", "--attention", "flash"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_unknown_or_mismatched_preset(tmp_path, capsys):
    code, err = _train(TINY[:2] + ["--model", "huge", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "unknown model preset 'huge'" in err and "vit-fmnist" in err
    code, err = _train(["--task", "listops", "--model", "vit-fmnist", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "preset 'vit-fmnist' is for task(s) fmnist, not 'listops'" in err
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("listops", "nope")


def test_unwritable_output_directory(tmp_path, capsys, cache_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = _train(TINY + ["--cache-dir", cache_dir, "--out", str(blocker / "run")], capsys)
    assert code == 2 and "is not writable" in err and str(blocker / "run") in err


def test_missing_data_leaves_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "fmnist", "--model", "tiny", "--data-root", str(tmp_path / "nowhere")]
    args += ["--out", str(out)]
    code, err = _train(args, capsys)
    assert code == 2 and "nowhere" in err
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_existing_run_needs_resume_and_matching_settings(tmp_path, capsys, cache_dir):
    out = tmp_path / "run"
    base = TINY + ["--max-steps", "2", "--cache-dir", cache_dir, "--out", str(out)]
    assert cli.main(base) == 0
    code, err = _train(base, capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    code, err = _train(base + ["--resume", "--attention", "full"], capsys)
    assert code == 2 and "cannot resume" in err and "attention" in err
    code, err = _train(base + ["--resume", "--batch-size", "4"], capsys)
    assert code == 2 and "cannot resume" in err and "recipe" in err


def test_eval_rejects_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 40)
    assert evaluate.main(["--checkpoint", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "absent")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "meta").mkdir()
    ok = tmp_path / "meta" / "model.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(ok), metadata={"mita_meta": json.dumps({"task": "listops"})})
    assert evaluate.main(["--checkpoint", str(ok)]) == 2
    assert "does not describe a buildable model" in capsys.readouterr().err
