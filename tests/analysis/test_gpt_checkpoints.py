"""GPT checkpoints in the analysis commands: attention swaps, m/k changes and routing figures say up front
that they are not supported for causal language models (one line, exit 2); plain mita eval works."""

from __future__ import annotations

import pytest

from mita.cli import main as mita_main
from mita.models import build_model
from mita.train.checkpoint import save_model_file


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory):
    model = build_model("gpt", attention="full", vocab_size=16, max_len=32, dim=16, depth=1, num_heads=2)
    kwargs = {k: v for k, v in model.config.items() if k != "name"}
    meta = {"task": "mqar", "attention": "full", "model": "gpt", "model_kwargs": kwargs,
            "data_kwargs": {"seq_len": 32, "num_pairs": 4, "vocab_size": 16}}  # fmt: skip
    path = tmp_path_factory.mktemp("gpt") / "model.safetensors"
    return str(save_model_file(path, model, meta))


@pytest.mark.parametrize(
    "argv, what",
    [
        (["eval", "--attention", "mita"], "--attention / --num-landmarks / --topk"),
        (["eval", "--topk", "4"], "--attention / --num-landmarks / --topk"),
        (["viz", "--out", "OUT"], "mita viz"),
        (["grid", "--num-landmarks", "2", "--topk", "2", "--out", "OUT"], "mita grid"),
    ],
)
def test_unsupported_commands_say_so_in_one_line(gpt_checkpoint, tmp_path, capsys, argv, what):
    pytest.importorskip("matplotlib")
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert mita_main([argv[0], "--checkpoint", gpt_checkpoint, "--test-size", "4", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{what} is not supported for GPT checkpoints" in err


def test_plain_eval_of_a_gpt_checkpoint_works(gpt_checkpoint, capsys):
    assert mita_main(["eval", "--checkpoint", gpt_checkpoint, "--test-size", "4"]) == 0
