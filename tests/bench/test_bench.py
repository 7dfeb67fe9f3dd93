"""``mita bench``: the table, JSON and ratios it writes, its FLOP count, and its errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mita.bench import cli
from mita.bench.measure import Case, run_case, useful_flops
from mita.bench.report import add_ratios, bench_table
from mita.io import write_json
from mita.system import cpu_model


def _case(**kw) -> Case:
    base = dict(method="mita-torch", mode="fwd", n=256, batch=2, heads=3, dim=16, landmarks=8, topk=4,
                dtype="float32", device="cpu")  # fmt: skip
    return Case(**{**base, **kw})


def test_flops_follow_the_formulas():
    # SDPA: 2 N^2 (d + dv) per batch and head; MiTA: 2 N (d + dv) (2m + k)
    assert useful_flops(_case(method="sdpa")) == 2 * 256**2 * 32 * 2 * 3
    assert useful_flops(_case()) == 2 * 256 * 32 * (2 * 8 + 4) * 2 * 3
    assert useful_flops(_case(mode="fwdbwd")) == 3 * useful_flops(_case())
    # MiTA's count grows linearly in N, SDPA's quadratically
    assert useful_flops(_case(n=512)) == 2 * useful_flops(_case())
    assert useful_flops(_case(method="sdpa", n=512)) == 4 * useful_flops(_case(method="sdpa"))


def test_threads_option_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        run_case(_case(reps=1, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_run_case_reports_time_and_flop_rate():
    row = run_case(_case(mode="fwdbwd", reps=1))
    assert row["time_s"] > 0 and row["reps_timed"] == 1
    assert row["tflops"] == pytest.approx(useful_flops(_case(mode="fwdbwd")) / row["time_s"] / 1e12)
    assert row["gflops"] == pytest.approx(1000 * row["tflops"])


def test_ratios_pair_rows_of_the_same_shape_and_mode():
    rows = [
        {"label": "seq", "n": 64, "mode": "fwd", "method": "sdpa", "time_s": 2.0, "peak_mem_rise_bytes": 100},
        {"label": "seq", "n": 64, "mode": "fwd", "method": "mita-torch", "time_s": 0.5,
         "peak_mem_rise_bytes": 50},
        {"label": "seq", "n": 64, "mode": "fwdbwd", "method": "mita-torch", "time_s": 1.0,
         "peak_mem_rise_bytes": 10},
        {"label": "vision", "n": 64, "mode": "fwd", "method": "mita-torch", "error": "boom"},
    ]  # fmt: skip
    add_ratios(rows)
    assert rows[1]["speedup_vs_sdpa"] == 4.0 and rows[1]["memory_ratio_vs_sdpa"] == 0.5
    assert "speedup_vs_sdpa" not in rows[2]  # no SDPA row in fwdbwd: no ratio
    table = bench_table(rows)
    assert "| seq | 64 | fwd | mita-torch | 500.0 | — | 0 | 4.00x |" in table
    assert "boom" in table


def test_command_writes_table_json_and_vision_shape(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["--n", "64", "--batch", "1", "--heads", "2", "--head-dim", "8", "--num-landmarks", "4",
            "--topk", "4", "--device", "cpu", "--reps", "1", "--in-process", "--vision", "2,1,8",
            "--backends", "torch", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = data["results"]
    # seq and vision shapes x fwd, fwdbwd x sdpa, mita-torch (no CUDA here, so no triton)
    assert len(rows) == 8 and {r["method"] for r in rows} == {"sdpa", "mita-torch"}
    vision = [r for r in rows if r["label"] == "vision"]
    assert {(r["batch"], r["heads"], r["dim"], r["n"]) for r in vision} == {(2, 1, 8, 197)}
    assert all("speedup_vs_sdpa" in r for r in rows if r["method"] != "sdpa")
    assert all(r["tflops"] > 0 and r["gflops"] > 0 for r in rows)
    md = (out / "bench.md").read_text()
    assert "GFLOP/s" in md and f"Measured on {cpu_model()}" in md and "torch " + torch.__version__ in md
    assert data["meta"]["device"] == "cpu" and data["meta"]["processor"] == cpu_model()
    assert (out / "bench.png").stat().st_size > 0


def test_flag_names(tmp_path):
    args = cli._parser().parse_args(["--head-dim", "16", "--num-landmarks", "8"])
    assert (args.dim, args.landmarks) == (16, 8) and args.device == "auto"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "64,abc"], "--n must be a comma-separated list of integers"),
        (["--n", "16", "--num-landmarks", "32"], "every N must be >= m"),
        (["--modes", "fwd,back"], "unknown mode"),
        (["--vision", "2,3"], "--vision must be batch,heads,head-dim"),
        (["--vision", "2,0,8"], "--vision sizes must be positive"),
        (["--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--heads", "0"], "--heads must be a positive integer, got 0"),
        (["--head-dim", "-1"], "--head-dim must be a positive integer, got -1"),
        (["--num-landmarks", "0"], "--num-landmarks must be a positive integer, got 0"),
        (["--reps", "0"], "--reps must be a positive integer, got 0"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--backends", "bogus"], "--backends: unknown backend 'bogus'"),
        (["--backends", "triton"], "--backends triton needs --device cuda"),
        (["--device", "foo"], "--device 'foo' is not a device"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    if "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mita bench: ")
    assert not (tmp_path / "o" / "bench.json").exists()


def test_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(cli, "run_case", lambda *a: pytest.fail("work started"))
    argv = ["--n", "64", "--num-landmarks", "4", "--topk", "4", "--device", "cpu", "--in-process"]
    assert cli.main([*argv, "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_missing_matplotlib_is_announced_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_plot_available", lambda: False)
    argv = ["--n", "64", "--batch", "1", "--heads", "1", "--head-dim", "8", "--num-landmarks", "4", "--topk",
            "4", "--device", "cpu", "--reps", "1", "--in-process", "--no-vision", "--modes", "fwd",
            "--backends", "torch", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("mita bench: matplotlib is not installed, so bench.png will be skipped")
    assert not (tmp_path / "bench.png").exists() and (tmp_path / "bench.json").exists()


def test_json_is_strict(tmp_path):
    write_json(
        tmp_path / "b.json", {"meta": {"device": "cpu"}, "results": [{"n": 1, "time_s": float("nan")}]}
    )
    text = (tmp_path / "b.json").read_text()
    assert "NaN" not in text and json.loads(text)["results"][0]["time_s"] is None
