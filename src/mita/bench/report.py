"""Tables, JSON and plots for benchmark results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..analysis.plots import figure
from ..io import atomic_path, markdown_table


def _key(r: dict) -> tuple:
    return (r.get("label", ""), r["n"], r["mode"])


def add_ratios(rows: list[dict]) -> list[dict]:
    """Attach ``speedup_vs_sdpa`` (SDPA time / method time, same shape and mode, same run)."""
    sdpa = {_key(r): r for r in rows if r["method"] == "sdpa" and "time_s" in r}
    for r in rows:
        base = sdpa.get(_key(r))
        if base is not None and "time_s" in r and r["method"] != "sdpa":
            r["speedup_vs_sdpa"] = base["time_s"] / r["time_s"]
            r["memory_ratio_vs_sdpa"] = r["peak_mem_rise_bytes"] / max(1, base["peak_mem_rise_bytes"])
    return rows


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def format_gflops(r: dict) -> str:
    """A row's achieved GFLOP/s as a table cell (rows that hold only ``tflops`` too; ``—`` without)."""
    if "gflops" in r:
        return f"{r['gflops']:,.1f}"
    if "tflops" in r:  # a row that carries only the TFLOP/s figure
        return f"{1000 * r['tflops']:,.1f}"
    return "—"


def bench_table(rows: Sequence[dict], meta: dict | None = None) -> str:
    """One row per (shape, N, mode, method): time, achieved GFLOP/s of the method's own FLOPs
    (:func:`mita.bench.measure.useful_flops`), peak memory rise and speed-up over SDPA; with ``meta``, a
    first line naming the CPU (or GPU), threads and torch version the figures were measured with."""
    head = ""
    if meta is not None:
        where = meta.get("gpu") or f"{meta.get('processor', '?')}, {meta.get('cpu_threads', '?')} threads"
        head = f"Measured on {where} ({meta.get('device', '?')}), torch {meta.get('torch', '?')}.\n"
        if meta.get("command"):
            head += f"Command: `{meta['command']}`\n"
        head += "\n"
    headers = [
        "shape",
        "N",
        "mode",
        "method",
        "time (ms)",
        "GFLOP/s",
        "peak mem rise (MiB)",
        "speed-up vs SDPA",
    ]
    lines = []
    for r in rows:
        if "error" in r:
            cells = [r.get("label", ""), str(r["n"]), r["mode"], r["method"], "—", "—", "—", r["error"]]
        else:
            ratio = f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "1.00x"
            cells = [
                r.get("label", ""),
                str(r["n"]),
                r["mode"],
                r["method"],
                f"{1000 * r['time_s']:,.1f}",
                format_gflops(r),
                _mb(r["peak_mem_rise_bytes"]),
                ratio,
            ]
        lines.append(cells)
    return head + markdown_table(headers, lines, align="lrllrrrr") + "\n"


def write_plot(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Time vs N (log-log) per method and mode, and speed-up vs N, drawn with the analysis figure helper
    (headless, no pyplot) and written atomically. False if matplotlib is missing or no row has a time."""
    seq = [r for r in rows if r.get("label") == "seq" and "time_s" in r]
    if not seq:
        return False
    try:
        fig = figure(11, 4.2)
    except ImportError:
        return False
    ax_t, ax_s = fig.subplots(1, 2)
    styles = {"fwd": "--", "fwdbwd": "-"}
    for method in sorted({r["method"] for r in seq}):
        for mode in ("fwd", "fwdbwd"):
            pts = sorted(((r["n"], r) for r in seq if r["method"] == method and r["mode"] == mode),
                         key=lambda x: x[0])  # fmt: skip
            if not pts:
                continue
            ns = [n for n, _ in pts]
            ax_t.plot(
                ns, [1000 * r["time_s"] for _, r in pts], styles[mode], marker="o", label=f"{method} {mode}"
            )
            if method != "sdpa":
                sp = [(n, r["speedup_vs_sdpa"]) for n, r in pts if "speedup_vs_sdpa" in r]
                if sp:
                    ax_s.plot(*zip(*sp), styles[mode], marker="o", label=f"{method} {mode}")
    ax_t.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="time (ms)", title="time")
    ax_s.axhline(1.0, color="gray", lw=0.8)
    ax_s.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="SDPA time / MiTA time")
    ax_s.set_title("speed-up over SDPA (same run)")
    for ax in (ax_t, ax_s):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return True
