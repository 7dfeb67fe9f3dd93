"""results/causal.py: the MQAR curriculum (short stages before the task) is parsed and checked up front,
trains every stage in order with one learning-rate schedule, and keeps runs of different curricula or
seeds apart in the run cache; --full-first runs are the full run until they switch to MiTA;
--routed-only runs have no shared expert."""

from __future__ import annotations

import argparse

import pytest


def _args(causal, **kw):
    base = dict(steps=4, batch_size=2, lr=3e-3, seq_len=64, test_size=8, pairs=[4], vocab=16, block_size=8,
                topk=8, seed=0, curriculum=None, full_first=0, routed_only=False)  # fmt: skip
    return causal._filled(argparse.Namespace(**{**base, **kw}), "mqar")


def test_curriculum_stages_keep_tokens_per_step_and_end_at_the_task(results_script):
    causal = results_script("causal")
    specs = causal.mqar_specs(_args(causal, curriculum="16:1:3,32:2:5"))
    for spec in specs:  # every kind trains the same stages, the last one the task itself
        stages = spec["curriculum"]
        assert [st["data"]["seq_len"] for st in stages] == [16, 32, 64]
        assert [st["data"]["num_pairs"] for st in stages] == [1, 2, 4]
        assert [st["steps"] for st in stages] == [3, 5, 4]
        assert [st["batch_size"] * st["data"]["seq_len"] for st in stages] == [128, 128, 128]
        assert stages[-1]["data"] == spec["data"]
    assert all(s["curriculum"] == [] for s in causal.mqar_specs(_args(causal)))
    given = causal._curriculum(_args(causal, curriculum="16:1:3:5"))
    assert [st["batch_size"] for st in given] == [5]


@pytest.mark.parametrize(
    "bad, match",
    [
        ("16:1", "'16:1' is not LEN:PAIRS:STEPS\\[:BATCH\\]"),
        ("16:x:3", "'16:x:3' is not LEN:PAIRS:STEPS\\[:BATCH\\]"),
        ("96:1:3", "'96:1:3' needs STEPS, BATCH >= 1 and 1 <= LEN <= --seq-len"),
        ("16:1:0", "'16:1:0' needs STEPS, BATCH >= 1"),
        ("16:1:3:0", "'16:1:3:0' needs STEPS, BATCH >= 1"),
        ("16:1:3:4:5", "'16:1:3:4:5' is not LEN"),
        ("16:5:3", "seq_len=16 cannot hold num_pairs=5"),
        ("8:1:3", "seq_len must be an int >= 16"),
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


def test_a_curriculum_run_trains_each_stage_in_order(monkeypatch, results_script):
    causal = results_script("causal")
    import mita.data

    built = []
    real = mita.data.build_dataset

    def recording(task, split, **kw):
        built.append((split, kw["seq_len"], kw["num_pairs"]))
        return real(task, split, **kw)

    monkeypatch.setattr(mita.data, "build_dataset", recording)
    spec = next(
        s for s in causal.mqar_specs(_args(causal, curriculum="16:1:3,32:2:2")) if s["attention"] == "full"
    )
    rec = causal.train_run({**spec, "sweep_grid": []})
    assert [b for b in built if b[0] == "train"] == [("train", 16, 1), ("train", 32, 2), ("train", 64, 4)]
    assert rec["curve"][-1]["step"] == 3 + 2 + 4  # one schedule over all stages, evaluated at the end
    assert rec["final"]["targets"] == 8 * 4  # the test set is the task's (4 queries per example)


def test_full_first_runs_are_the_full_run_until_they_switch(results_script):
    causal = results_script("causal")
    specs = causal.mqar_specs(_args(causal, curriculum="16:1:2", full_first=3))
    full = next(s for s in specs if s["attention"] == "full")
    switched = [s for s in specs if s.get("full_first")]
    assert sorted(s["model"]["landmark_horizon"] for s in switched) == ["frozen", "prefix"]
    assert all(s["name"].endswith("-full3") for s in switched)
    frozen = next(s for s in switched if s["model"]["landmark_horizon"] == "frozen")
    runs = [causal.train_run({**s, "eval_at": [3], "sweep_grid": []}) for s in (full, frozen)]
    at_switch = [r["curve"][0] for r in runs]
    assert at_switch[0]["step"] == 3 and at_switch[0] == at_switch[1]  # bit for bit the same run so far
    assert runs[0]["final"] != runs[1]["final"]  # then MiTA's own steps


@pytest.mark.parametrize("bad", [6, 7])
def test_full_first_must_leave_steps_to_the_kind(bad, results_script):
    causal = results_script("causal")
    with pytest.raises(ValueError, match=f"--full-first {bad} must be between 1 and the run's 6 steps - 1"):
        causal.mqar_specs(_args(causal, curriculum="16:1:2", full_first=bad))


def test_routed_only_adds_mita_runs_without_the_shared_expert(results_script):
    causal = results_script("causal")
    specs = causal.mqar_specs(_args(causal, routed_only=True, full_first=3))
    routed = [s for s in specs if s["model"].get("shared") is False]
    assert len(routed) == 4  # both horizons, from scratch and after full attention
    assert all("-routed" in s["name"] for s in routed) and len({s["name"] for s in specs}) == len(specs)
    assert sum(bool(s.get("full_first")) for s in routed) == 2
    rec = causal.train_run({**routed[0], "steps": 2, "sweep_grid": []})
    assert "routed-only" in causal._label(rec) and 0 <= rec["final"]["accuracy"] <= 1
