"""``mita train --full-first S`` (mita.train.full_first): until step S the run is the full-attention run of
the same seed, bit for bit; after it, the run's own kind trains on (and is what gets saved); a switch that
leaves no step to that kind, or a model without causal mixers, is refused before a run directory exists."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mita.train import cli
from mita.train.loop import KILL_ENV

from .helpers import run_mita

MQAR = ["--task", "mqar", "--data-arg", "seq_len=64", "--data-arg", "num_pairs=4",
        "--data-arg", "vocab_size=32", "--curriculum", "16:2:2:8", "--max-steps", "3", "--batch-size", "4",
        "--block-size", "8", "--topk", "8", "--landmark-horizon", "frozen", "--test-size", "16",
        "--eval-every", "3", "--no-progress"]  # fmt: skip


def _evals(out: Path) -> dict[int, tuple[float, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: (e["test_loss"], e["test_accuracy"]) for e in lines if e["event"] == "eval"}


def test_full_first_is_the_full_run_until_it_switches(tmp_path, cache_dir):
    common = [*MQAR, "--cache-dir", cache_dir]
    assert cli.main([*common, "--attention", "full", "--out", str(tmp_path / "full")]) == 0
    argv = [*common, "--attention", "mita", "--full-first", "3", "--out", str(tmp_path / "ff")]
    assert cli.main(argv) == 0
    full, switched = _evals(tmp_path / "full"), _evals(tmp_path / "ff")
    assert full[3] == switched[3]  # the same weights after the same 3 full-attention steps
    assert full[5] != switched[5]  # then MiTA's own steps
    s = json.loads((tmp_path / "ff" / "summary.json").read_text())
    assert s["config"]["full_first"] == 3 and s["steps"] == 5
    assert s["model_kwargs"]["attention"] == "mita" and s["routing_recall"]  # saved and analysed as MiTA


def test_a_switch_with_no_step_left_or_no_causal_mixer_is_refused(tmp_path, cache_dir, capsys):
    out = tmp_path / "late"
    argv = [*MQAR, "--cache-dir", cache_dir, "--attention", "mita", "--full-first", "5", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "--full-first 5 must be between 1 and the run's 5 steps - 1" in capsys.readouterr().err
    assert not out.exists()
    listops = ["--task", "listops", "--preset", "tiny", "--data-arg", "seq_len=64", "--train-size", "16",
               "--test-size", "8", "--batch-size", "8", "--full-first", "1", "--out", str(tmp_path / "lo"),
               "--no-progress"]  # fmt: skip
    assert cli.main(listops) == 2
    assert "--full-first: only for the causal kinds of the GPT presets" in capsys.readouterr().err
    assert not (tmp_path / "lo").exists()


def test_a_run_killed_before_the_switch_resumes_with_full_attention(tmp_path, cache_dir):
    from safetensors.torch import load_file  # noqa: PLC0415 - optional dependency

    args = [*MQAR, "--cache-dir", cache_dir, "--attention", "mita", "--full-first", "3", "--save-every", "2",
            "--log-every", "1"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_mita([*args, "--out", str(straight)]).returncode == 0
    assert run_mita([*args, "--out", str(killed)], env={KILL_ENV: "3"}).returncode == 137
    res = run_mita([*args, "--out", str(killed), "--resume"])
    assert res.returncode == 0 and "at step 2/5" in res.stderr, res.stderr  # step 3 still full attention
    assert _evals(straight) == _evals(killed)
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
