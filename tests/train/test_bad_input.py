"""Bad input to ``mita train`` / ``mita eval``: a clear one-line error, exit code 2, no partial checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from mita.analysis import eval_cli, loading
from mita.cli import main
from mita.data import TASKS, get_task
from mita.nn.registry import ATTENTION_CLASSES
from mita.train import cli
from mita.train.checkpoint import save_model_file
from mita.train.presets import build, get_preset

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
    code, err = _train(TINY[:2] + ["--preset", "huge", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "unknown model preset 'huge'" in err and "vit-fmnist" in err
    code, err = _train(["--task", "listops", "--preset", "vit-fmnist", "--out", str(tmp_path / "b")], capsys)
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
    args = ["--task", "fmnist", "--preset", "tiny", "--data-root", str(tmp_path / "nowhere")]
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
    assert eval_cli.main(["--checkpoint", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert eval_cli.main(["--checkpoint", str(tmp_path / "absent")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "meta").mkdir()
    ok = tmp_path / "meta" / "model.safetensors"
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({"w": torch.zeros(1)}, str(ok), metadata={"mita_meta": json.dumps({"task": "listops"})})
    assert eval_cli.main(["--checkpoint", str(ok)]) == 2
    assert "does not describe a buildable model" in capsys.readouterr().err


# ---- settings checked before anything is created ----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "foo"], "--device 'foo' is not a device"),
        (["--data-arg", "bogus=1"], "--data-arg bogus: not a data option"),
        (["--data-arg", "seq_len=abc"], "--data-arg seq_len='abc': must be an integer"),
        (["--data-arg", "augment=yes"], "--data-arg augment='yes': must be true or false"),
        (["--model-arg", "depth=-1"], "--model-arg depth=-1: must be a positive number"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--topk", "100000"], "topk=100000 exceeds the sequence length N=64"),
        (["--num-landmarks", "65"], "num_landmarks=65 exceeds the sequence length N=64"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--weight-decay", "-5"], "--weight-decay must be a finite number >= 0"),
        (["--warmup", "1"], "--warmup must be a finite number in [0, 1)"),
    ],
)
def test_bad_settings_fail_in_one_line_before_the_run_directory_exists(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    args = list(TINY)
    code, err = _train(args + ["--out", str(out)] + extra, capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("mita train: error: ")  # one line, no traceback
    assert not out.exists()


def test_preset_flag(tmp_path, capsys):
    args = cli.build_parser().parse_args(["--task", "listops", "--preset", "tiny"])
    assert cli.config_from_args(args).preset == "tiny" and capsys.readouterr().err == ""


def test_task_and_attention_choices_come_from_the_registries(monkeypatch):
    monkeypatch.setitem(TASKS, "listops-copy", get_task("listops"))
    monkeypatch.setitem(ATTENTION_CLASSES, "mita-copy", ATTENTION_CLASSES["mita"])
    args = cli.build_parser().parse_args(["--task", "listops-copy", "--attention", "mita-copy"])
    assert (args.task, args.attention) == ("listops-copy", "mita-copy")


def _mita_without(modules, argv, cwd):
    """``python -m mita ARGV`` in a fresh process where importing any of ``modules`` fails."""
    code = (
        f"import sys\nfor m in {list(modules)!r}: sys.modules[m] = None  # import m now raises ImportError\n"
        f"from mita.cli import main\nsys.exit(main({list(argv)!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_without_safetensors_stops_before_training(tmp_path):
    out = tmp_path / "run"
    res = _mita_without(["safetensors"], ["train", *TINY, "--out", str(out)], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "needs safetensors" in res.stderr and "pip install" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()  # no config.json / metrics.jsonl of a run that cannot save its weights


@pytest.mark.parametrize(
    "argv",
    [
        ["grid", "--checkpoint", "CKPT", "--out", "OUT"],
        ["swap", "--checkpoints", "CKPT", "--out", "OUT"],
        ["viz", "--checkpoint", "CKPT", "--out", "OUT"],
        ["data", "--tasks", "listops", "--size", "4", "--out", "OUT"],
    ],
)
def test_figure_commands_without_matplotlib_stop_before_working(argv, tmp_path, monkeypatch, capsys):

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setenv("MITA_CACHE", str(tmp_path / "cache"))
    argv = [
        str(tmp_path / "out") if a == "OUT" else str(tmp_path / "missing") if a == "CKPT" else a for a in argv
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing was built


def test_eval_errors_are_one_line(tmp_path, capsys):

    assert eval_cli.main(["--checkpoint", str(tmp_path), "--device", "foo"]) == 2
    assert "--device 'foo' is not a device" in capsys.readouterr().err
    # metadata that builds a model but does not name its task
    kwargs = {"vocab_size": 16, "num_classes": 2, "max_len": 8, "dim": 8, "depth": 1, "num_heads": 2,
              "attention": "full"}  # fmt: skip
    meta = {"attention": "full", "model": "seq", "model_kwargs": kwargs}
    save_model_file(tmp_path / "untasked" / "model.safetensors", build("seq", kwargs), meta)
    assert eval_cli.main(["--checkpoint", str(tmp_path / "untasked")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mita eval: error: ") and "does not name its task" in err and err.count("\n") == 1


def test_eval_json_to_an_unwritable_path_fails_before_evaluating(tmp_path, capsys, cache_dir, monkeypatch):
    run = tmp_path / "run"
    assert cli.main(TINY + ["--max-steps", "1", "--cache-dir", cache_dir, "--out", str(run)]) == 0
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    calls = []
    monkeypatch.setattr(loading, "evaluate", lambda *a, **k: calls.append(1))
    assert eval_cli.main(["--checkpoint", str(run), "--json", str(blocker / "eval.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mita eval: error: cannot write to") and str(blocker) in err
    assert calls == []  # refused before any evaluation
