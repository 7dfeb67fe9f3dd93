"""scripts/gpu_check.sh, the prepared GPU check: its dry run (what CI can check without a GPU)
and the pieces of scripts/gpu_grid.py that decide what the GPU run reports (targets, skipped cases)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("env", "install", "smoke", "pytest_gpu", "grid", "causal")


def _gpu_grid():
    spec = importlib.util.spec_from_file_location("gpu_grid", ROOT / "scripts" / "gpu_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_dry_run_plans_every_stage_and_runs_the_interpreter_kernel_check(tmp_path):
    pytest.importorskip("triton", reason="the kernel check runs the Triton kernels in the interpreter")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    plan = (tmp_path / "plan.md").read_text()
    for stage in (*STAGES, "summary"):
        assert f"| {stage} |" in plan, stage
    assert "pytest -m gpu -x" in plan and "tests/ops/test_triton.py" in plan  # the gpu tests are found
    assert "resolve: ok" in plan and "grid case: long N=1048576 fwdbwd mita-triton" in plan
    stages = {s["name"]: s for s in json.loads((tmp_path / "stages.json").read_text())["stages"]}
    assert [n for n in stages if n in STAGES] == list(STAGES)
    assert all(stages[n]["status"] == "planned" and stages[n]["timeout_s"] > 0 for n in STAGES)
    assert stages["resolve"]["status"] == "ok"
    assert stages["kernel_check"]["status"] == "ok" and stages["kernel_check"]["rc"] == 0
    log = (tmp_path / "log.txt").read_text().splitlines()
    check = next(json.loads(line) for line in log if '"kernel_check"' in line)
    assert check["kernel_check"] == "passed" and check["routing_equal"]
    assert max(check["max_abs_error"].values()) < 1e-4
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool brings back at most 8 files


def _row(n, mode, method, time_s, mem=100, label="long"):
    return dict(label=label, n=n, mode=mode, method=method, time_s=time_s, peak_mem_rise_bytes=mem)


def test_targets_are_judged_from_the_grid_rows():
    grid = _gpu_grid()
    rows = [
        _row(16384, "fwdbwd", "mita-triton", 1.0), _row(16384, "fwdbwd", "sdpa", 6.0),
        _row(16384, "fwdbwd", "mita-torch", 4.0),
        _row(65536, "fwdbwd", "mita-triton", 1.0), _row(65536, "fwdbwd", "sdpa", 19.0),
        _row(65536, "fwdbwd", "mita-torch", 2.0),
        _row(197, "fwd", "mita-triton", 1.0, mem=300, label="vision"),
        _row(197, "fwd", "sdpa", 1.5, label="vision"),
        dict(label="long", n=1048576, mode="fwdbwd", method="mita-triton", error="out of memory: ..."),
    ]  # fmt: skip
    verdicts = {t: (v, ev) for t, v, ev in grid.targets(rows)}
    assert verdicts["fwd+bwd >= 5x SDPA at N=16384"] == ("met", "6.00x")
    assert verdicts["fwd+bwd >= 20x SDPA at N=65536"] == ("not met", "19.00x")
    assert verdicts[">= 3x torch backend (fwd+bwd) from N=16K"][0] == "not met"  # 4x at 16K but 2x at 64K
    assert verdicts["no slower than SDPA at the vision shape"] == ("met", "fwd: 1.50x")
    assert verdicts["peak memory never above SDPA's"][0] == "not met"  # 300 > 100 at the vision shape
    assert verdicts["N = 1M fwd+bwd runs"][0] == "not measured"  # an error row is no run
    assert {v for _, v, _ in grid.targets([])} == {"not measured"}


def test_cases_predicted_too_slow_are_skipped_with_the_reason():
    pred = _gpu_grid().Predictor()
    sdpa, mita = ("long", "sdpa", "fwd"), ("long", "mita-triton", "fwd")
    assert pred.skip_reason(sdpa, 4096, cap=30, left=100, reps=3) is None  # nothing measured yet
    pred.record(sdpa, 65536, {"time_s": 0.5})
    pred.record(mita, 65536, {"time_s": 0.5})
    # SDPA grows as N^2: 16x the length is 256x the time (128 s > cap); MiTA grows about linearly.
    assert "cap" in pred.skip_reason(sdpa, 1048576, cap=30, left=1000, reps=3)
    assert pred.skip_reason(mita, 1048576, cap=30, left=1000, reps=3) is None
    assert "left" in pred.skip_reason(mita, 1048576, cap=30, left=12, reps=3)  # ~10.6 s, one call
    pred.record(mita, 262144, {"error": "out of memory: tried to allocate"})
    assert "failed at a smaller N" in pred.skip_reason(mita, 1048576, cap=30, left=1000, reps=3)
