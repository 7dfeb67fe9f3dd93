"""``mita bench --causal`` / ``--decode``: tables, strict JSON, same-run ratios, FLOP counts, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mita.bench import cli
from mita.bench.causal import _parser as causal_parser
from mita.bench.causal import causal_flops, causal_table, decode_table


def test_causal_flops_follow_the_formulas():
    # SDPA causal: N^2 (d + dv) per batch and head; causal MiTA: 2 N (d + dv) (2 n_l + k + b / 2)
    assert causal_flops(1024, 32, 32, 64, 64, 4, 1, "sdpa") == 1024**2 * 64 * 4
    assert causal_flops(1024, 32, 32, 64, 64, 4, 1, "mita") == 2 * 1024 * 64 * (2 * 16 + 64 + 32) * 4
    # MiTA's n_l term grows with N (N^2 / b), SDPA's with N^2
    assert causal_flops(2048, 32, 32, 64, 64, 1, 1, "sdpa") == 4 * causal_flops(
        1024, 32, 32, 64, 64, 1, 1, "sdpa"
    )


def test_bench_causal_writes_table_json_and_ratios(tmp_path, capsys):
    out = tmp_path / "c"
    rc = cli.main(["--causal", "--n", "128", "--heads", "2", "--head-dim", "8", "--block-size", "16",
                   "--topk", "8", "--reps", "1", "--out", str(out), "--no-plot"])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "causal.json").read_text())
    rows = data["results"]
    assert {(r["method"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("sdpa", "mita-prefix", "mita-frozen") for mode in ("fwd", "fwdbwd")
    }
    by = {(r["method"], r["mode"]): r for r in rows}
    for mode in ("fwd", "fwdbwd"):
        for hor in ("prefix", "frozen"):
            r = by[(f"mita-{hor}", mode)]
            assert r["speedup_vs_sdpa"] == pytest.approx(by[("sdpa", mode)]["time_s"] / r["time_s"])
            assert r["tflops"] > 0
    assert data["meta"]["cpu"] and data["meta"]["torch"]
    table = (out / "causal.md").read_text()
    assert "speed-up vs SDPA causal" in table and "mita-prefix" in table
    assert "GFLOP/s" in table and "TFLOP/s" not in table  # the unit of the other bench modes
    assert "CPU:" in capsys.readouterr().out


def test_bench_decode_reports_latency_ratio_and_cache_memory(tmp_path):
    out = tmp_path / "d"
    rc = cli.main(["--decode", "--context", "96", "--heads", "2", "--head-dim", "8", "--block-size", "16",
                   "--topk", "8", "--reps", "1", "--tokens", "16", "--out", str(out),
                   "--no-plot"])  # fmt: skip
    assert rc == 0
    rows = json.loads((out / "decode.json").read_text())["results"]
    dense = next(r for r in rows if r["method"] == "dense")
    assert dense["kv_bytes"] == 2 * 2 * 96 * 8 * 4  # K and V, float32, at the context length
    for hor in ("prefix", "frozen"):
        r = next(r for r in rows if r["method"] == f"mita-{hor}")
        assert r["speedup_vs_dense"] == pytest.approx(dense["ms_per_token"] / r["ms_per_token"])
        assert r["extra_pct_of_kv"] == pytest.approx(100 * r["extra_bytes"] / r["kv_bytes"])
        assert r["kv_bytes"] == 2 * 2 * (96 + 2 * 16) * 8 * 4  # the cache also holds the timed tokens
    assert "extra % of K/V" in (out / "decode.md").read_text()


def test_tables_show_errors_and_ratios():
    rows = [
        {"n": 64, "mode": "fwd", "method": "sdpa", "time_s": 0.002, "tflops": 1.0},
        {
            "n": 64,
            "mode": "fwd",
            "method": "mita-prefix",
            "time_s": 0.001,
            "tflops": 0.5,
            "speedup_vs_sdpa": 2.0,
        },
        {"n": 64, "mode": "fwd", "method": "mita-frozen", "error": "out of memory"},
    ]
    table = causal_table(rows)
    assert "2.00x" in table and "out of memory" in table
    assert "| 64 | fwd | sdpa | 2.0 | 1,000.0 | 1.00x |" in table  # 1 TFLOP/s shown as GFLOP/s
    drow = {"context": 8, "method": "mita-prefix", "ms_per_token": 1.0, "ms_per_token_median": 1.0,
            "ms_max": 2.0, "speedup_vs_dense": 3.0, "kv_bytes": 2**20, "extra_bytes": 2**10,
            "extra_pct_of_kv": 0.1}  # fmt: skip
    assert "3.0x" in decode_table([drow])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--causal", "--n", "12,x"], "--n must be"),
        (["--decode", "--context", "0"], "--context must be"),
        (["--causal", "--horizons", "past"], "unknown horizon"),
        (["--causal", "--modes", "bwd"], "unknown mode"),
        (["--causal", "--heads", "4", "--kv-heads", "3"], "multiple of --kv-heads"),
        (["--causal", "--block-size", "0"], "--block-size"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(argv)


def test_bad_arguments_exit_2_in_one_line(capsys):
    for argv in (
        ["--causal", "--n", "12,x"],
        ["--decode", "--context", "0"],
        ["--causal", "--threads", "-1"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("mita bench: ")
    res = subprocess.run([sys.executable, "-m", "mita", "bench", "--causal", "--n", "x"], capture_output=True)
    assert res.returncode == 2 and res.stderr.decode().startswith("mita bench: --n must be")


def test_cpu_backend_with_the_prefix_horizon_only_is_refused():
    with pytest.raises(SystemExit, match="frozen horizon only"):
        cli.main(["--causal", "--backends", "cpu", "--horizons", "prefix"])


def test_head_dim_is_the_same_flag_in_both_modes(tmp_path):
    args = causal_parser().parse_args(["--causal", "--head-dim", "16"])
    assert args.dim == 16 and cli._parser().parse_args(["--head-dim", "16"]).dim == 16
