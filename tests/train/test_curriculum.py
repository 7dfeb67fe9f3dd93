"""``mita train --curriculum`` (mita.train.curriculum): the parser, its errors, the stage batches, and a
short MQAR run through the CLI whose summary carries the routing recall split."""

from __future__ import annotations

import json

import pytest
import torch

from mita.train import cli
from mita.train.config import TrainConfig
from mita.train.curriculum import Stage, parse_curriculum, stage_batches


def test_parser_reads_stages_with_and_without_a_batch():
    assert parse_curriculum("64:4:600:32, 128:8:400") == [Stage(64, 4, 600, 32), Stage(128, 8, 400, None)]
    assert parse_curriculum(None) == [] and parse_curriculum("") == []


@pytest.mark.parametrize("text,bad", [("64:4", "64:4"), ("64:4:600,x:1:2", "x:1:2"), ("64:4:0", "64:4:0"),
                                      ("64:4:10:8:1", "64:4:10:8:1"), ("64:-1:10", "64:-1:10")])  # fmt: skip
def test_a_bad_stage_raises_naming_it(text, bad):
    with pytest.raises(ValueError, match=f"stage '{bad}'"):
        parse_curriculum(text)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"curriculum": "256:4:10"}, "longer than the task's seq_len=128"),
        ({"curriculum": "64:40:10"}, r"stage 64:40:10: mqar"),  # the task's own check, naming the stage
        ({"curriculum": "64:4:10", "task": "listops"}, "--curriculum is for --task mqar"),
        ({"landmark_horizon": "future"}, "--landmark-horizon"),
        ({"block_size": 0}, "--block-size"),
    ],
)
def test_config_checks_the_curriculum_and_causal_options(kw, match):
    base = {"task": "mqar", "data_kwargs": {"seq_len": 128, "num_pairs": 8, "vocab_size": 64}}
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**base, **kw}).validate()


def test_stage_batches_depend_on_the_step_only(cache_dir):
    stages = parse_curriculum("16:2:3:4,32:4:2:2")
    kw = {"vocab_size": 32, "cache_dir": cache_dir}
    full = list(stage_batches(stages, "mqar", kw, start=0, batch_size=8, seed=3))
    assert [tuple(x.shape) for x, _ in full] == [(4, 16)] * 3 + [(2, 32)] * 2
    tail = list(stage_batches(stages, "mqar", kw, start=2, batch_size=8, seed=3))
    for (x, y), (x2, y2) in zip(full[2:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    halves = [list(stage_batches(stages, "mqar", kw, start=0, batch_size=8, seed=3, rank=r, world_size=2))
              for r in (0, 1)]  # fmt: skip
    assert not torch.equal(halves[0][0][0], halves[1][0][0])  # ranks take disjoint shares


def test_mqar_run_with_a_curriculum_reports_the_routing_split(tmp_path, cache_dir):
    out = tmp_path / "run"
    argv = ["--task", "mqar", "--attention", "mita", "--data-arg", "seq_len=64", "--data-arg", "num_pairs=4",
            "--data-arg", "vocab_size=32", "--curriculum", "16:2:3:8,32:2:2", "--max-steps", "2",
            "--batch-size", "4", "--block-size", "8", "--topk", "8", "--landmark-horizon", "frozen",
            "--test-size", "16", "--cache-dir", cache_dir, "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (
        s["steps"] == 7 and s["recipe"]["total_steps"] == 7 and s["recipe"]["curriculum"] == "16:2:3:8,32:2:2"
    )
    assert s["model_kwargs"]["block_size"] == 8 and s["model_kwargs"]["landmark_horizon"] == "frozen"
    layers = s["routing_recall"]
    assert [r["layer"] for r in layers] == [0, 1]
    for r in layers:
        assert 0 <= r["recall_any_head"] <= r["coverage_any_head"] <= 1 and 0 <= r["chance_any_head"] <= 1
    assert (
        cli.main([*argv[:-3], "--attention", "full", "--out", str(tmp_path / "full"), "--no-progress"]) == 0
    )


def test_block_size_is_refused_for_a_model_without_causal_kinds(tmp_path, capsys):
    assert cli.main(["--task", "listops", "--block-size", "8", "--out", str(tmp_path / "x")]) == 2
    assert "--block-size: only for the causal kinds" in capsys.readouterr().err
