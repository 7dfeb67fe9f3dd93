"""results/fmnist.py (the README's main job) refuses, in one line and before any training, to reuse run
directories that already hold runs unless told to (--resume re-reports them, --fresh trains again)."""

from __future__ import annotations

import pytest


def test_existing_runs_are_refused_before_any_training(tmp_path, monkeypatch, results_script):
    fmnist = results_script("fmnist")
    (tmp_path / "mita-s0").mkdir()
    monkeypatch.setattr(fmnist, "run_all", lambda *a, **k: pytest.fail("trained despite existing runs"))
    with pytest.raises(SystemExit, match=r"mita-s0 already hold runs; pass --resume .* --fresh"):
        fmnist.main(["--runs", str(tmp_path), "--attentions", "mita,full"])


def test_fresh_deletes_only_the_scripts_own_run_directories(tmp_path, monkeypatch, results_script):
    fmnist = results_script("fmnist")
    (tmp_path / "mita-s0").mkdir()
    (tmp_path / "other").mkdir()
    seen = {}

    def fake_run_all(cmds, jobs):
        seen["exists"] = (tmp_path / "mita-s0").exists()
        raise RuntimeError("stop here")

    monkeypatch.setattr(fmnist, "run_all", fake_run_all)
    with pytest.raises(RuntimeError, match="stop here"):
        fmnist.main(["--runs", str(tmp_path), "--attentions", "mita,full", "--fresh"])
    assert seen == {"exists": False} and (tmp_path / "other").exists()


def test_attention_options_and_seeds_reach_mita_train(tmp_path, monkeypatch, results_script):
    fmnist = results_script("fmnist")
    seen = {}

    def fake_run_all(cmds, jobs):
        seen.update(cmds)
        raise RuntimeError("stop here")

    monkeypatch.setattr(fmnist, "run_all", fake_run_all)
    with pytest.raises(RuntimeError, match="stop here"):
        fmnist.main(["--runs", str(tmp_path), "--attentions", "mita:router=distill,full", "--seeds", "0,1"])
    assert sorted(seen) == [("full", 0), ("full", 1), ("mita:router=distill", 0), ("mita:router=distill", 1)]
    cmd = seen["mita:router=distill", 1]
    assert cmd[cmd.index("--attention") + 1] == "mita" and cmd[cmd.index("--seed") + 1] == "1"
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "mita-router=distill-s1")
    assert cmd[cmd.index("--model-arg") + 1] == "router=distill" and "--model-arg" not in seen["full", 0]
