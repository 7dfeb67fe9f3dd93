"""The stages of scripts/gpu_check.sh that run Python: the kernel check, the timing grid, the causal
timings and the summary. Run by that script; each subcommand also runs on its own.

    python3 scripts/gpu_grid.py versions                           # GPU, CUDA, torch, triton
    python3 scripts/gpu_grid.py kernel-check [--device cpu|cuda]   # tiny fwd+bwd vs the reference
    python3 scripts/gpu_grid.py plan                               # list the grid and causal cases
    python3 scripts/gpu_grid.py grid --out DIR [--budget S] [--plan]
    python3 scripts/gpu_grid.py causal --out DIR [--budget S] [--plan]
    python3 scripts/gpu_grid.py summary --out DIR --stages TSV [--dry-run]

Timings use :mod:`mita.bench.measure` (``Case``, ``run_case``) in this process, SDPA pinned to its
flash kernel, and are written after every case, so a stage killed by its timeout keeps what it measured.
A case is skipped, with the reason recorded, when its time predicted from the last N measured for the
same method (N^2 for SDPA, N for MiTA) would exceed the per-case cap or the time left in the stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mita import mita_attention, mita_causal_attention
from mita.bench.measure import Case, run_case
from mita.bench.timing import time_call
from mita.io import write_json, write_text
from mita.landmarks import block_mean
from mita.ops.triton.backend import availability
from mita.ops.triton.interpreter import interpreter_requested
from mita.system import cpu_model, resolve_device

GRID_NS = (4096, 16384, 65536, 262144, 1048576)
LONG = dict(batch=1, heads=16, head_dim=128, m=64, k=64, dtype="bfloat16")
VISION = dict(batch=256, heads=6, head_dim=64, m=25, k=25, dtype="bfloat16", n=197, grid=(14, 14))
METHODS = ("mita-triton", "sdpa", "mita-torch")  # most valuable first
MODES = ("fwdbwd", "fwd")
CAUSAL_NS = (4096, 16384, 65536)
CAUSAL_BLOCK = 64


# ------------------------------------------------------------------------------------ bench glue


def _case(method: str, mode: str, shape: dict, n: int, device: str, reps: int) -> Case:
    """The ``mita.bench.measure.Case`` of one grid cell."""
    return Case(
        method=method, mode=mode, n=n, batch=shape["batch"], heads=shape["heads"], dim=shape["head_dim"],
        landmarks=shape["m"], topk=shape["k"], dtype=shape["dtype"], device=device, reps=reps,
        grid=shape.get("grid"),
    )  # fmt: skip


def _plan_grid(ns: tuple[int, ...]) -> list[tuple[str, str, str, dict, int]]:
    """(label, method, mode, shape, N) in order of value: 4K..64K, the vision shape, then 256K and 1M."""
    order = [("long", n) for n in ns if n <= 65536] + [("vision", VISION["n"])]
    order += [("long", n) for n in ns if n > 65536]
    plan = []
    for label, n in order:
        shape = LONG if label == "long" else VISION
        plan += [(label, method, mode, shape, n) for mode in MODES for method in METHODS]
    return plan


def _versions() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton  # noqa: PLC0415

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count
        )
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["gpu"] = None
    info["cpu"] = cpu_model()
    return info


def _measure(case) -> dict:
    """``run_case`` with SDPA pinned to flash on CUDA; errors (out of memory included) become a field."""
    try:
        if case.method == "sdpa" and case.device == "cuda":
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return run_case(case)
        return run_case(case)
    except Exception as err:  # noqa: BLE001 - one failing case must not end the grid
        kind = "out of memory" if isinstance(err, torch.OutOfMemoryError) else type(err).__name__
        return {"error": f"{kind}: {str(err).splitlines()[0][:240] if str(err) else ''}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _row(label: str, method: str, mode: str, shape: dict, n: int) -> dict:
    return {"label": label, "method": method, "mode": mode, "n": n, **{k: shape[k] for k in LONG}}


class Predictor:
    """Predicts a case's seconds per call from the last N measured for the same (label, method, mode)."""

    def __init__(self) -> None:
        self.last: dict[tuple, tuple[int, float]] = {}
        self.failed: dict[tuple, str] = {}

    def skip_reason(self, key: tuple, n: int, cap: float, left: float, reps: int) -> str | None:
        if key in self.failed:
            return f"skipped: failed at a smaller N ({self.failed[key]})"
        if key not in self.last:
            return None if left > 5 else "skipped: no time left in the stage"
        n0, t0 = self.last[key]
        per_call = t0 * (n / n0) ** (2.0 if key[1] == "sdpa" else 1.1)
        calls = 1 if per_call >= 10.0 else 1 + reps  # measure.run_case times a call over 10 s once
        if per_call > cap:
            return f"skipped: predicted {per_call:.1f} s a call > cap {cap:.0f} s"
        if per_call * calls > left - 5:
            return f"skipped: predicted {per_call * calls:.0f} s > {left:.0f} s left in the stage"
        return None

    def record(self, key: tuple, n: int, result: dict) -> None:
        if "error" in result:
            self.failed[key] = result["error"][:80]
        else:
            self.last[key] = (n, result["time_s"])


def _warm_up(device: str, out: list) -> None:
    """Compile the Triton kernels at the grid's shapes before timing (compiles can take > 10 s cold)."""
    # 4K and 16K: the tile size (a compile-time constant) changes between them, then stays.
    for shape, n in ((LONG, 4096), (LONG, 16384), (VISION, VISION["n"])):
        for mode in MODES:
            t0 = time.perf_counter()
            res = _measure(_case("mita-triton", mode, shape, n, device, reps=1))
            out.append({"warm_up": f"{mode} N={n}", "seconds": round(time.perf_counter() - t0, 1), **res})


def cmd_grid(args) -> int:
    ns = tuple(int(x) for x in args.ns.split(","))
    plan = _plan_grid(ns)
    if args.plan:
        for label, method, mode, shape, n in plan:
            _case(method, mode, shape, n, args.device, args.reps)  # the bench accepts every case
            print(f"grid case: {label} N={n} {mode} {method}")
        cap = f"{args.case_cap:.0f} s a call"
        print(f"grid: {len(plan)} cases, each skipped when predicted over {cap} or over the time left")
        return 0
    start = time.perf_counter()
    path = Path(args.out) / "grid.json"
    doc = {"versions": _versions(), "budget_s": args.budget, "case_cap_s": args.case_cap, "warm_up": []}
    doc["rows"] = rows = []
    if args.device == "cuda":
        _warm_up(args.device, doc["warm_up"])
    pred = Predictor()
    for label, method, mode, shape, n in plan:
        key = (label, method, mode)
        left = args.budget - (time.perf_counter() - start)
        row = _row(label, method, mode, shape, n)
        reason = pred.skip_reason(key, n, args.case_cap, left, args.reps)
        if reason:
            row["skipped"] = reason
        else:
            res = _measure(_case(method, mode, shape, n, args.device, args.reps))
            pred.record(key, n, res)
            row.update({k: res[k] for k in ("time_s", "tflops", "peak_mem_rise_bytes", "error") if k in res})
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(path, doc)
    doc["seconds"] = round(time.perf_counter() - start, 1)
    write_json(path, doc)
    return _status(rows, "mita-triton")


# ---------------------------------------------------------------------------------------- causal


def _causal_call(q, k, v, topk: int, backend: str):
    """``mita_causal_attention(..., block_size=64, landmark_horizon="prefix")``, landmark ``j`` the mean of
    query block ``j``."""
    r = block_mean(q, CAUSAL_BLOCK)
    return mita_causal_attention(
        q, k, v, r, topk=topk, block_size=CAUSAL_BLOCK, landmark_horizon="prefix", backend=backend
    )


def _time(fn, tensors: tuple, kwargs: dict, mode: str, reps: int, device: str) -> dict:
    """Best of ``reps`` calls of ``fn(*tensors, **kwargs)`` after one warm-up, and the peak memory rise."""

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(*tensors, **kwargs)
        else:
            fn(*tensors, **kwargs).backward(torch.ones_like(tensors[0]))
            for t in tensors:
                t.grad = None

    try:
        step()  # warm-up / compile
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = [time_call(step, device) for _ in range(reps)]
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
        return {"time_s": min(times), "peak_mem_rise_bytes": peak}
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:240] if str(err) else ''}"}
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def cmd_causal(args) -> int:
    methods = ("sdpa", "mita-auto")  # "auto" is what a caller gets (the torch backend today)
    if args.plan:
        for n in CAUSAL_NS:
            print(f"causal case: N={n} block {CAUSAL_BLOCK} " + ", ".join(methods))
        return 0
    path = Path(args.out) / "causal.json"
    doc = {"versions": _versions(), "rows": []}
    start, sh = time.perf_counter(), LONG
    failed: set[tuple] = set()
    dtype = getattr(torch, sh["dtype"])
    for n in CAUSAL_NS:
        g = torch.Generator().manual_seed(0)
        x = [torch.randn(sh["batch"], sh["heads"], n, sh["head_dim"], generator=g) for _ in range(3)]
        for mode in MODES:
            try:
                q, k, v = (t.to(args.device, dtype).requires_grad_(mode == "fwdbwd") for t in x)
                no_inputs = None
            except (RuntimeError, AssertionError) as err:  # out of memory, or no such device
                no_inputs = f"{type(err).__name__}: {str(err).splitlines()[0][:240]}"
            for method in methods:
                row = {"method": method, "mode": mode, "n": n, "block_size": CAUSAL_BLOCK, **sh}
                if no_inputs:
                    row["error"] = f"inputs: {no_inputs}"
                elif (method, mode) in failed:
                    row["skipped"] = "failed at a smaller N"
                elif time.perf_counter() - start > args.budget:
                    row["skipped"] = "no time left in the stage"
                elif method == "sdpa":
                    sdpa = F.scaled_dot_product_attention
                    row.update(_time(sdpa, (q, k, v), {"is_causal": True}, mode, args.reps, args.device))
                else:
                    kw = {"topk": sh["k"], "backend": method.split("-", 1)[1]}
                    row.update(_time(_causal_call, (q, k, v), kw, mode, args.reps, args.device))
                if "error" in row:
                    failed.add((method, mode))
                doc["rows"].append(row)
                print(json.dumps(row), flush=True)
                write_json(path, doc)
    return _status(doc["rows"], "mita-auto")


def _status(rows: list[dict], method: str) -> int:
    """Exit status of a timing stage: 1 when ``method`` failed in a case or never got measured."""
    mine = [r for r in rows if r["method"] == method]
    if any("error" in r for r in mine) or not any("time_s" in r for r in mine):
        print(f"gpu_grid: {method} failed in a case or was never measured", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------- kernel check


def cmd_kernel_check(args) -> int:
    """One tiny MiTA forward+backward through the Triton kernels (GQA, padding, several blocks) against
    the dense reference: output, routing and the four gradients."""
    if args.device == "cpu" and not interpreter_requested():
        print("kernel-check: on CPU the kernels need TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    ok, why = availability()
    if not ok:
        print(f"kernel-check: triton backend unavailable: {why}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    b, h, hkv, n, d, m, topk = 2, 4, 2, 40, 16, 3, 6
    cpu = [torch.randn(b, hh, n, d, generator=g) for hh in (h, hkv, hkv)] + [
        torch.randn(b, h, m, d, generator=g)
    ]
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, -7:] = True
    weight = torch.randn(b, h, n, d, generator=g)
    results = {}
    for backend in ("triton", "reference"):
        x = [t.to(args.device).requires_grad_() for t in cpu]
        out, routing = mita_attention(
            *x, topk=topk, key_padding_mask=mask.to(args.device), backend=backend, return_routing=True
        )
        grads = torch.autograd.grad((out * weight.to(args.device)).sum(), x)
        keys = routing.key_index.sort(-1).values  # top-k sets; their order is free
        results[backend] = [
            out.detach().cpu(),
            *(gr.cpu() for gr in grads),
            routing.expert_index.cpu(),
            keys.cpu(),
        ]
    tri, ref = results["triton"], results["reference"]
    names = ("out", "dq", "dk", "dv", "dlandmarks")
    errors = {name: float((a - e).abs().max()) for name, a, e in zip(names, tri, ref)}
    close = all(torch.allclose(a, e, atol=2e-5, rtol=2e-5) for a, e in zip(tri[:5], ref[:5]))
    same_routing = torch.equal(tri[5], ref[5]) and torch.equal(tri[6], ref[6])
    passed = close and same_routing
    line = {
        "kernel_check": "passed" if passed else "FAILED",
        "device": args.device,
        "routing_equal": same_routing,
    }
    print(json.dumps({**line, "max_abs_error": errors}))
    return 0 if passed else 1


# --------------------------------------------------------------------------------------- summary


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def junit_counts(path: Path) -> dict[str, int] | None:
    """``tests``, ``failures``, ``errors``, ``skipped`` from pytest's JUnit XML (our own file), or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}


def gpu_tests_passed(stage_ok: bool, counts: dict[str, int] | None) -> bool:
    """The condition for ``AUTO_USES_TRITON = True``: the stage passed, nothing failed, and tests ran
    (on a machine without CUDA every gpu test is skipped and pytest still exits 0)."""
    if not stage_ok or counts is None:
        return False
    return counts["failures"] == counts["errors"] == 0 and counts["tests"] > counts["skipped"]


def _index(rows: list[dict]) -> dict:
    return {(r["label"], r["n"], r["mode"], r["method"]): r for r in rows if "time_s" in r}


def targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, verdict, evidence) for the GPU speed targets (docs/triton.md), from the grid rows."""
    idx = _index(rows)

    def ratio(n, mode, other, label="long"):
        a, b = idx.get((label, n, mode, "mita-triton")), idx.get((label, n, mode, other))
        return None if a is None or b is None else b["time_s"] / a["time_s"]

    out = []
    for n, want in ((16384, 5.0), (65536, 20.0)):
        r = ratio(n, "fwdbwd", "sdpa")
        verdict = "not measured" if r is None else ("met" if r >= want else "not met")
        out.append((f"fwd+bwd >= {want:.0f}x SDPA at N={n}", verdict, "-" if r is None else f"{r:.2f}x"))
    got = [(n, ratio(n, "fwdbwd", "mita-torch")) for n in GRID_NS if n >= 16384]
    got = [(n, r) for n, r in got if r is not None]
    verdict = "not measured" if not got else ("met" if all(r >= 3 for _, r in got) else "not met")
    out.append(
        (
            ">= 3x torch backend (fwd+bwd) from N=16K",
            verdict,
            ", ".join(f"{n}: {r:.2f}x" for n, r in got) or "-",
        )
    )
    vis = [(mode, ratio(VISION["n"], mode, "sdpa", "vision")) for mode in MODES]
    vis = [(mode, r) for mode, r in vis if r is not None]
    verdict = "not measured" if not vis else ("met" if all(r >= 1 for _, r in vis) else "not met")
    out.append(
        (
            "no slower than SDPA at the vision shape",
            verdict,
            ", ".join(f"{m}: {r:.2f}x" for m, r in vis) or "-",
        )
    )
    mem = []
    for (label, n, mode, method), r in idx.items():
        base = idx.get((label, n, mode, "sdpa"))
        if method == "mita-triton" and base is not None:
            mem.append((f"{label} {n} {mode}", r["peak_mem_rise_bytes"] <= base["peak_mem_rise_bytes"]))
    verdict = "not measured" if not mem else ("met" if all(ok for _, ok in mem) else "not met")
    over = [name for name, ok in mem if not ok]
    out.append(
        (
            "peak memory never above SDPA's",
            verdict,
            "above at " + "; ".join(over) if over else f"{len(mem)} cases",
        )
    )
    big = idx.get(("long", 1048576, "fwdbwd", "mita-triton"))
    out.append(
        ("N = 1M fwd+bwd runs", "met" if big else "not measured", f"{big['time_s']:.3f} s" if big else "-")
    )
    return out


def _grid_table(rows: list[dict]) -> str:
    idx = _index(rows)
    head = "| shape | N | mode | method | time (ms) | TFLOP/s | peak mem (MiB) | vs SDPA | vs torch | note |"
    lines = [head, "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r["label"], str(r["n"]), r["mode"], r["method"]]
        if "time_s" not in r:
            lines.append(
                "| " + " | ".join(cells + ["—"] * 5 + [r.get("error") or r.get("skipped", "")]) + " |"
            )
            continue
        rel = []
        for other in ("sdpa", "mita-torch"):
            base = idx.get((r["label"], r["n"], r["mode"], other))
            rel.append(f"{base['time_s'] / r['time_s']:.2f}x" if base and other != r["method"] else "")
        mem = r.get("peak_mem_rise_bytes")
        cells += [f"{r['time_s'] * 1e3:.2f}", f"{r.get('tflops', float('nan')):.1f}",
                  "—" if mem is None else f"{mem / 2**20:,.0f}", *rel, ""]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_summary(args) -> int:
    out = Path(args.out)
    stages = []
    for line in Path(args.stages).read_text().splitlines():
        name, status, rc, seconds, timeout_s, command = line.split("\t", 5)
        nums = dict(rc=int(rc), seconds=int(seconds), timeout_s=int(timeout_s))
        stages.append(dict(name=name, status=status, **nums, command=command))
    v = _versions()
    mode = "dry-run" if args.dry_run else "run"
    write_json(out / "stages.json", {"mode": mode, "versions": v, "stages": stages})
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    gpu = "no GPU"
    if v.get("gpu"):
        gpu = f"GPU {v['gpu']} (capability {v['capability']}, {v['sms']} SMs, {v['gpu_memory_gib']} GiB)"
    text = [f"# GPU check ({mode}), {when}", "", f"{gpu}; CUDA {v['cuda']}, torch {v['torch']}, "
            f"triton {v['triton']}, Python {v['python']}; CPU {v['cpu']}.", "",
            "| stage | status | rc | seconds | timeout (s) |", "|---|---|---:|---:|---:|"]  # fmt: skip
    text += [
        f"| {s['name']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['timeout_s']} |" for s in stages
    ]
    junit = out / "junit-gpu.xml"
    if junit.exists() or any(s["name"] == "pytest_gpu" and s["status"] != "planned" for s in stages):
        counts = junit_counts(junit)
        got = "no JUnit XML" if counts is None else ", ".join(f"{v} {k}" for k, v in counts.items())
        stage_ok = any(s["name"] == "pytest_gpu" and s["status"] == "ok" for s in stages)
        verdict = "passed: `AUTO_USES_TRITON = True` may be set" if gpu_tests_passed(stage_ok, counts) else (
            "did not pass (or ran nothing): keep `AUTO_USES_TRITON = False`")  # fmt: skip
        text += ["", f"`pytest -m gpu`: {got}; {verdict}."]
    grid = _load(out / "grid.json")
    if grid.get("rows"):
        shapes = "bf16, B=1, H=16, d=128, m=k=64; vision B=256, H=6, d=64, N=197, m=k=25"
        text += [
            "",
            f"## Targets ({shapes})",
            "",
            "| target | verdict | evidence |",
            "|---|---|---|",
        ]
        text += [f"| {t} | {verdict} | {ev} |" for t, verdict, ev in targets(grid["rows"])]
        text += ["", "## Timing grid (best of the timed calls; SDPA = flash; one run, interleaved)", "",
                 _grid_table(grid["rows"])]  # fmt: skip
    causal = _load(out / "causal.json")
    if causal:
        text += ["", "## Causal op", ""]
        if causal.get("skipped"):
            text.append(f"Skipped: {causal['skipped']}.")
        for r in causal.get("rows", []):
            what = f"{r['time_s'] * 1e3:.2f} ms" if "time_s" in r else r.get("error") or r.get("skipped")
            text.append(f"- N={r['n']} {r['mode']} {r['method']}: {what}")
    write_text(out / "summary.md", "\n".join(text) + "\n")
    print("\n".join(text))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("versions")
    sub.add_parser("plan", help="list the grid and causal cases (checking the bench accepts them)")
    k = sub.add_parser("kernel-check")
    k.add_argument("--device", default=resolve_device("auto").type)
    for name in ("grid", "causal"):
        s = sub.add_parser(name)
        s.add_argument("--out", default=".")
        s.add_argument("--device", default=resolve_device("auto").type)
        s.add_argument("--budget", type=float, default=280.0, help="seconds for the whole stage")
        s.add_argument("--reps", type=int, default=3)
        s.add_argument("--plan", action="store_true", help="list the cases (checking the bench accepts them)")
        if name == "grid":
            s.add_argument("--ns", default=",".join(map(str, GRID_NS)))
            s.add_argument("--case-cap", type=float, default=30.0, help="skip a case predicted slower a call")
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--stages", required=True, help="TSV: name, status, rc, seconds, timeout, command")
    s.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "versions":
        print(json.dumps(_versions(), indent=1))
        return 0
    if args.cmd == "plan":
        common = dict(out=".", device="cuda", budget=0.0, reps=3, plan=True)
        cmd_grid(argparse.Namespace(**common, ns=",".join(map(str, GRID_NS)), case_cap=30.0))
        return cmd_causal(argparse.Namespace(**common))
    return {"kernel-check": cmd_kernel_check, "grid": cmd_grid, "causal": cmd_causal, "summary": cmd_summary}[
        args.cmd
    ](args)


if __name__ == "__main__":
    sys.exit(main())
