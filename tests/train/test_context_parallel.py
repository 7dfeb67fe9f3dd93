"""``torchrun --nproc_per_node=2 -m mita train --context-parallel 2``: each sequence split over two CPU
processes (gloo) trains as the single-process run."""

import json
import sys

import pytest

from mita.train.distributed import DistInfo, data_parallel

from ..distributed.spawn import free_port
from .helpers import TINY, run_mita


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, tested on Linux")
def test_two_process_context_parallel_matches_single_process(tmp_path, cache_dir):
    args = TINY + ["--max-steps", "4", "--log-every", "1", "--device", "cpu", "--cache-dir", cache_dir]
    single = run_mita(args + ["--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stdout + single.stderr
    rdzv = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--rdzv-backend=c10d", rdzv, "-m", "mita", "train"]  # fmt: skip
    cp = run_mita(args + ["--context-parallel", "2", "--out", str(tmp_path / "cp")], launcher=launcher)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    ref, got = _losses(tmp_path / "single"), _losses(tmp_path / "cp")
    assert len(ref) == len(got) == 4
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    summary = json.loads((tmp_path / "cp" / "summary.json").read_text())
    ref_summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["recipe"]["context_parallel"] == 2 and summary["world_size"] == 2
    # evaluation splits the sequences too (each group evaluates its part of the test set)
    assert summary["test_accuracy"] == ref_summary["test_accuracy"]
    assert summary["test_loss"] == pytest.approx(ref_summary["test_loss"], rel=1e-5)


def test_context_parallel_needs_a_multiple_of_its_size():
    assert data_parallel(DistInfo(rank=5, world_size=6), 2) == (3, 2)
    assert data_parallel(DistInfo(), 1) == (1, 0)
    with pytest.raises(ValueError, match="multiple of 4 processes, got 6"):
        data_parallel(DistInfo(rank=0, world_size=6), 4)
    with pytest.raises(ValueError, match="multiple of 2 processes, got 1"):
        data_parallel(DistInfo(), 2)


def test_context_parallel_without_torchrun_is_refused_before_the_run_dir(tmp_path, cache_dir):
    out = tmp_path / "run"
    res = run_mita(TINY + ["--context-parallel", "2", "--device", "cpu", "--cache-dir", cache_dir,
                           "--out", str(out)])  # fmt: skip
    assert res.returncode != 0
    assert "--context-parallel 2 needs torchrun with a multiple of 2 processes, got 1" in res.stderr
    assert not out.exists()
