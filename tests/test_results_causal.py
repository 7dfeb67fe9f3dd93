"""results/causal.py: the MQAR curriculum (short stages before the task) is parsed and checked up front and
handed to ``mita train`` stage by stage before the task's own steps; runs of different curricula or seeds
stay apart; every spec is a ``mita train`` command that builds exactly the spec's model; --full-first runs
are the full run until they switch to MiTA; --routed-only runs have no shared expert; a smoke run through
the driver writes records the report reads, and the committed records still render the committed tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from mita.data import build_dataset, get_task
from mita.train import cli
from mita.train import report as train_report
from mita.train.checkpoint import load_model
from mita.train.presets import causal_overrides, get_preset, model_spec
from mita.train.recall import mqar_routing_summary

ROOT = Path(__file__).resolve().parents[1]


def _args(causal, **kw):
    base = dict(steps=4, batch_size=2, lr=3e-3, seq_len=64, test_size=8, pairs=[4], vocab=16, block_size=8,
                topk=8, seed=0, curriculum=None, full_first=0, routed_only=False)  # fmt: skip
    return causal._filled(argparse.Namespace(**{**base, **kw}), "mqar")


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_curriculum_stages_keep_tokens_per_step_and_end_at_the_task(results_script, tmp_path):
    causal = results_script("causal")
    specs = causal.mqar_specs(_args(causal, curriculum="16:1:3,32:2:5"))
    for spec in specs:  # every kind trains the same stages, the last one the task itself
        stages = spec["curriculum"]
        assert [st["data"]["seq_len"] for st in stages] == [16, 32, 64]
        assert [st["data"]["num_pairs"] for st in stages] == [1, 2, 4]
        assert [st["steps"] for st in stages] == [3, 5, 4]
        assert [st["batch_size"] * st["data"]["seq_len"] for st in stages] == [128, 128, 128]
        assert stages[-1]["data"] == spec["data"]
        argv = causal.train_argv(spec, tmp_path / spec["name"])  # the stages in order, then the task's steps
        assert _flag(argv, "--curriculum") == "16:1:3:8,32:2:5:4" and _flag(argv, "--max-steps") == "4"
    assert all(s["curriculum"] == [] for s in causal.mqar_specs(_args(causal)))
    assert "--curriculum" not in causal.train_argv(causal.mqar_specs(_args(causal))[0], tmp_path)
    given = causal._curriculum(_args(causal, curriculum="16:1:3:5"))
    assert [st["batch_size"] for st in given] == [5]


@pytest.mark.parametrize(
    "bad, match",
    [
        ("16:1", "'16:1' is not LEN:PAIRS:STEPS\\[:BATCH\\]"),
        ("16:x:3", "'16:x:3' is not LEN:PAIRS:STEPS\\[:BATCH\\]"),
        ("96:1:3", "stage 96:1:3 is longer than the task's seq_len=64"),
        ("16:1:0", "'16:1:0' is not LEN:PAIRS:STEPS\\[:BATCH\\] with positive integers"),
        ("16:1:3:0", "'16:1:3:0' is not LEN:PAIRS:STEPS\\[:BATCH\\] with positive integers"),
        ("16:1:3:4:5", "'16:1:3:4:5' is not LEN"),
        ("16:5:3", "stage 16:5:3: .*seq_len=16 cannot hold num_pairs=5"),
        ("8:1:3", "stage 8:1:3: .*seq_len must be an int >= 16"),
    ],
)
def test_bad_curriculum_stages_are_refused_naming_them(bad, match, results_script):
    causal = results_script("causal")
    with pytest.raises(ValueError, match=match):
        causal._curriculum(_args(causal, curriculum=bad))


def test_run_names_tell_curricula_and_seeds_apart(results_script):
    causal = results_script("causal")
    names = {
        s["name"]
        for a in (_args(causal), _args(causal, curriculum="16:1:3"), _args(causal, seed=1))
        for s in causal.mqar_specs(a)
    }
    assert len(names) == 3 * 5  # five kinds for each of the three settings, no collisions
    assert any(n.endswith("-c16x1x3x8") for n in names) and any(n.endswith("-seed1") for n in names)


def _built_model(argv: list[str]) -> tuple[dict, object]:
    """The model keywords ``mita train ARGV`` builds, after its own checks and a forward pass (preflight)."""

    cfg = cli.config_from_args(cli.build_parser().parse_args(argv))
    cli.preflight(cfg)
    preset = get_preset(cfg.task, cfg.preset)
    info = dataclasses.replace(
        get_task(cfg.task), seq_len={**preset.data_kwargs, **cfg.data_kwargs}["seq_len"]
    )
    attn = {"num_landmarks": cfg.num_landmarks, "topk": cfg.topk, **causal_overrides(cfg)}
    return model_spec(preset, info, cfg.attention, attn, cfg.model_kwargs)[1], cfg


def test_every_spec_is_a_mita_train_command_building_the_specs_model(results_script, tmp_path):
    causal = results_script("causal")
    a = _args(causal, curriculum="16:1:2", full_first=3, routed_only=True)
    a.routers = ["argmax", "gate+distill", "grouped"]
    sh = causal._filled(argparse.Namespace(**{**vars(a), **dict.fromkeys(causal.DEFAULTS["shakespeare"])}),
                        "shakespeare")  # fmt: skip
    specs = [s for s in causal.mqar_specs(a) if "grouped" not in s["name"] or "frozen" in s["name"]]
    specs += causal.shakespeare_specs(sh)
    for spec in specs:
        argv = causal.train_argv(spec, tmp_path / spec["name"])
        kwargs, cfg = _built_model(argv)
        assert {k: kwargs[k] for k in spec["model"]} == spec["model"], spec["name"]
        assert set(kwargs) - set(spec["model"]) == {"attention", "vocab_size", "max_len"}, spec["name"]
        assert kwargs["attention"] == spec["attention"] and cfg.seed == spec["seed"]
        assert cfg.data_kwargs == spec["data"] and cfg.test_size == spec["test_size"]
        assert (cfg.lr, cfg.weight_decay, cfg.batch_size) == (spec["lr"], 0.1, spec["batch_size"])
        assert cfg.full_first == (spec.get("full_first") or None)


def test_full_first_specs_switch_from_the_full_run(results_script, tmp_path):
    causal = results_script("causal")
    specs = causal.mqar_specs(_args(causal, curriculum="16:1:2", full_first=3))
    full = next(s for s in specs if s["attention"] == "full")
    switched = [s for s in specs if s.get("full_first")]
    assert sorted(s["model"]["landmark_horizon"] for s in switched) == ["frozen", "prefix"]
    assert all(s["name"].endswith("-full3") for s in switched)

    def config(spec: dict) -> dict:
        return cli.config_from_args(
            cli.build_parser().parse_args(causal.train_argv(spec, tmp_path))
        ).to_dict()

    mine = ("attention", "full_first", "block_size", "topk", "landmark_horizon", "model_kwargs")
    for s in switched:  # the full run's settings (seed, data, recipe), plus the switch and MiTA's own
        got, base = config(s), config(full)
        assert got["full_first"] == 3 and got["attention"] == "mita"
        assert {k: v for k, v in got.items() if k not in mine} == {
            k: v for k, v in base.items() if k not in mine
        }


@pytest.mark.parametrize("bad", [6, 7])
def test_full_first_must_leave_steps_to_the_kind(bad, results_script):
    causal = results_script("causal")
    with pytest.raises(ValueError, match=f"--full-first {bad} must be between 1 and the run's 6 steps - 1"):
        causal.mqar_specs(_args(causal, curriculum="16:1:2", full_first=bad))


def test_routed_only_adds_mita_runs_without_the_shared_expert(results_script, tmp_path):
    causal = results_script("causal")
    specs = causal.mqar_specs(_args(causal, routed_only=True, full_first=3))
    routed = [s for s in specs if s["model"].get("shared") is False]
    assert len(routed) == 4  # both horizons, from scratch and after full attention
    assert all("-routed" in s["name"] for s in routed) and len({s["name"] for s in specs}) == len(specs)
    assert sum(bool(s.get("full_first")) for s in routed) == 2
    assert all("shared=false" in causal.train_argv(s, tmp_path) for s in routed)
    assert all("routed-only" in causal._label(s) for s in routed)


def test_a_smoke_run_through_the_driver(results_script, tmp_path, monkeypatch):
    """A full run and a routed-only MiTA run that is the full run for its first 4 of 2 + 4 steps, each one
    ``mita train``; their records, the report, and no training again once recorded."""
    causal = results_script("causal")
    runs, out = tmp_path / "runs", tmp_path / "causal"
    argv = ["mqar", "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--test-size", "8",
            "--pairs", "4", "--vocab", "16", "--block-size", "8", "--topk", "8", "--curriculum", "16:1:2",
            "--full-first", "4", "--routed-only", "--runs", str(runs), "--out", str(out), "--no-progress",
            "--device", "cpu", "--only=-full-s4,frozen-k8-b8-routed-s4-c16x1x2x8-full4"]  # fmt: skip
    assert causal.main(argv) == 0
    recs = {r["attention"]: r for r in json.loads(out.with_suffix(".json").read_text())["runs"]}
    full, mita = recs["full"], recs["mita"]
    assert [c["step"] for c in full["curve"]] == [4, 6] == [c["step"] for c in mita["curve"]]
    assert full["curve"][0] == mita["curve"][0]  # bit for bit the same run until the switch
    assert full["final"]["loss"] != mita["final"]["loss"]  # then MiTA's own steps
    assert full["final"]["targets"] == 8 * 4  # the test set is the task's (4 queries per example)
    assert full["recipe"]["curriculum"] == "16:1:2:8" and full["recipe"]["total_steps"] == 6
    assert "routed-only" in causal._label(mita) and 0 <= mita["final"]["accuracy"] <= 1
    assert [r["layer"] for r in mita["recall"]] == [0, 1] and "recall" not in full
    assert len(mita["sweep"]) == 5 and len(full["sweep"]) == 10  # the k x b grid; full: both horizons
    assert full["train_seconds"] > 0 and full["train_tokens_per_s"] > 0 and full["params"] > 0
    md = out.with_suffix(".md").read_text()
    assert (
        "| 64 | 4 | 16 | full | 0 |" in md and "mita frozen routed-only (k=8, b=8, full for steps 1-4)" in md
    )

    def no_training(cmds, jobs):
        assert not cmds, f"trained again: {list(cmds)}"
        return {}

    monkeypatch.setattr(train_report, "run_all", no_training)
    assert causal.main(argv) == 0


def test_a_shakespeare_run_through_the_driver_has_bits_per_byte_and_a_sample(results_script, tmp_path):
    causal = results_script("causal")
    out = tmp_path / "causal"
    argv = ["shakespeare", "--steps", "2", "--batch-size", "2", "--seq-len", "128", "--test-size", "2",
            "--runs", str(tmp_path / "runs"), "--out", str(out), "--no-progress", "--device", "cpu",
            "--only=-full-s2"]  # fmt: skip
    assert causal.main(argv) == 0
    (rec,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    final = rec["final"]
    assert final["targets"] == 2 * 128 and final["step"] == 2
    assert final["bits_per_byte"] == pytest.approx(final["loss"] / math.log(2))  # one byte per token
    assert rec["sample"].startswith("ROMEO:\n") and len(rec["sample"]) > 100
    md = out.with_suffix(".md").read_text()
    assert "## shakespeare-char: held-out plays" in md and "Sample (full, temperature 0.8" in md


def test_the_committed_records_render_the_committed_tables(results_script, tmp_path):
    causal = results_script("causal")
    shutil.copy(ROOT / "results" / "causal.json", tmp_path / "causal.json")
    causal.report(str(tmp_path / "no-runs"), str(tmp_path / "causal"))
    want = (ROOT / "results" / "causal.md").read_text().splitlines()
    got = (tmp_path / "causal.md").read_text().splitlines()
    assert len(got) == len(want)
    assert [g for i, g in enumerate(got) if i != 2] == [w for i, w in enumerate(want) if i != 2]
    assert got[2].split(";")[1:] == want[2].split(";")[1:]  # the hardware line: this machine's CPU


def test_router_cost_times_every_router(results_script, capsys):
    cost = results_script("router_cost")
    argv = ["--rounds", "1", "--seq-len", "64", "--pairs", "4", "--vocab", "32", "--batch-size", "2",
            "--block-size", "8", "--topk", "8"]  # fmt: skip
    assert cost.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [
        "argmax",
        "gate",
        "distill",
        "gate+distill",
        "gate+distill+select",
    ]
    assert rows[0].endswith("| 1.00× |")


def _tiny_mqar_run(out: Path, horizon: str) -> None:
    argv = ["--task", "mqar", "--attention", "mita", "--data-arg", "seq_len=64", "--data-arg", "num_pairs=8",
            "--data-arg", "vocab_size=32", "--max-steps", "2", "--batch-size", "2", "--block-size", "8",
            "--topk", "4", "--landmark-horizon", horizon, "--test-size", "4", "--device", "cpu",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0


def test_recall_split_groups_add_up_to_the_trainers_recall(results_script, tmp_path, capsys):
    """The per-block rows of ``results/mqar_recall_split.py`` partition the queries, its "all" row is the
    trainer's routing recall and coverage of the first layer on the same test sequences, and each head's
    chosen-landmark rows partition the queries into that head's hits."""
    split_script = results_script("mqar_recall_split")
    _tiny_mqar_run(tmp_path / "run", "frozen")
    rows, b = split_script.split(str(tmp_path / "run"), 3)
    assert b == 8
    by_key = [r for r in rows if r[0].startswith("needed key")]
    by_query = [r for r in rows if r[0].startswith("query in")]
    total = next(r for r in rows if r[0] == "all")
    assert sum(r[1] for r in by_key) == total[1] == sum(r[1] for r in by_query)
    assert all(r[2] <= r[3] + 1e-9 for r in rows)  # a routed hit is a covered key
    heads = sorted({r[0].split()[1] for r in rows if r[0].startswith("head ")})
    by_head = [[r for r in rows if r[0].startswith(f"head {h} routed")] for h in heads]
    assert all(len(rs) == 2 and sum(r[1] for r in rs) == total[1] for rs in by_head)  # each head's choices
    hits = sum(r[1] * r[2] for rs in by_head for r in rs if r[1])
    model, _ = load_model(tmp_path / "run")
    ds = build_dataset("mqar", "test", seed=0, seq_len=64, num_pairs=8, vocab_size=32)
    first = mqar_routing_summary(model, ds, n_examples=3)[0]
    assert total[2] == pytest.approx(first["recall_any_head"])
    assert total[3] == pytest.approx(first["coverage_any_head"])
    # each head's rows count that head's own hits: together, the trainer's mean over heads
    assert len(heads) == 2 and hits / (2 * total[1]) == pytest.approx(first["recall_mean_head"])
    assert split_script.main([str(tmp_path / "run"), "--examples", "3"]) == 0
    assert "| needed key in block 0 |" in capsys.readouterr().out


def test_recall_split_refuses_a_prefix_run(results_script, tmp_path):
    split_script = results_script("mqar_recall_split")
    _tiny_mqar_run(tmp_path / "run", "prefix")
    with pytest.raises(ValueError, match="frozen key sets"):
        split_script.split(str(tmp_path / "run"), 2)
