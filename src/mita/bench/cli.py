"""Command line of ``mita bench``."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from .measure import Case, run_case, run_isolated
from .report import add_ratios, markdown_table, write_json, write_plot

DEFAULT_NS = "1024,2048,4096,8192,16384,32768,65536"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mita bench", description=__doc__)
    p.add_argument("--n", default=DEFAULT_NS, help="comma-separated sequence lengths (default %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32, help="head dimension d")
    p.add_argument("--landmarks", type=int, default=64, help="m")
    p.add_argument("--topk", type=int, default=64, help="k")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="MiTA backends, default torch (+ triton on CUDA)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--sdpa-max-n", type=int, default=None, help="skip SDPA above this N (then no ratio)")
    p.add_argument(
        "--vision",
        default="64,3,64",
        help="batch,heads,head-dim of the vision shape (N = 197, m = k = 25; default %(default)s)",
    )
    p.add_argument("--no-vision", action="store_true", help="skip the vision shape")
    p.add_argument(
        "--in-process", action="store_true", help="no subprocess per case (memory is then cumulative)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per isolated case")
    p.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md and bench.png")
    p.add_argument("--causal", action="store_true", help="causal MiTA vs SDPA (--causal -h for more)")
    p.add_argument("--decode", action="store_true", help="MiTACache decoding vs dense (--decode -h)")
    return p


def _backends(args: argparse.Namespace) -> list[str]:
    if args.backends:
        return [b.strip() for b in args.backends.split(",") if b.strip()]
    names = ["torch"]
    if args.device.startswith("cuda"):
        from ..ops import triton_available

        if triton_available()[0]:
            names.append("triton")
    return names


def _cases(args: argparse.Namespace) -> list[tuple[str, Case]]:
    methods = ["sdpa"] + [f"mita-{b}" for b in _backends(args)]
    modes = [m.strip() for m in args.modes.split(",")]
    common = dict(dtype=args.dtype, device=args.device, reps=args.reps)
    out = []
    for n in (int(x) for x in args.n.split(",")):
        for mode in modes:
            for method in methods:
                if method == "sdpa" and args.sdpa_max_n is not None and n > args.sdpa_max_n:
                    continue
                shape = dict(
                    batch=args.batch, heads=args.heads, dim=args.dim, landmarks=args.landmarks, topk=args.topk
                )
                out.append(("seq", Case(method=method, mode=mode, n=n, **shape, **common)))
    if not args.no_vision:
        b, h, d = _vision_shape(args.vision)
        vis = dict(batch=b, heads=h, dim=d, landmarks=25, topk=25, grid=(14, 14))
        for mode in modes:
            for method in methods:
                out.append(("vision", Case(method=method, mode=mode, n=197, **vis, **common)))
    return out


def _vision_shape(text: str) -> tuple[int, int, int]:
    try:
        b, h, d = (int(x) for x in text.split(","))
    except ValueError:
        msg = f"mita bench: --vision must be batch,heads,head-dim (three integers), got {text!r}"
        raise SystemExit(msg) from None
    if min(b, h, d) < 1:
        raise SystemExit(f"mita bench: --vision sizes must be positive, got {text!r}")
    return b, h, d


def _validate(args: argparse.Namespace) -> None:
    if not args.no_vision:
        _vision_shape(args.vision)
    try:
        ns = [int(x) for x in args.n.split(",")]
    except ValueError:
        raise SystemExit(f"mita bench: --n must be comma-separated integers, got {args.n!r}") from None
    if min(ns) < max(args.landmarks, args.topk):
        raise SystemExit(f"mita bench: every N must be >= m ({args.landmarks}) and k ({args.topk})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("mita bench: --device cuda requested but CUDA is not available")
    bad = set(args.modes.split(",")) - {"fwd", "fwdbwd"}
    if bad:
        raise SystemExit(f"mita bench: unknown mode(s) {sorted(bad)}; use fwd and/or fwdbwd")


def meta_info(args: argparse.Namespace) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": args.device,
        "args": vars(args),
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if "--causal" in raw or "--decode" in raw:
        from .causal import main as causal_main  # causal op / decoding: its own options (mita.bench.causal)

        return causal_main(raw)
    args = _parser().parse_args(argv)
    _validate(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    isolate = not args.in_process and not args.device.startswith("cuda")
    rows = []
    cases = _cases(args)
    try:
        from tqdm import tqdm

        progress = tqdm(cases, desc="bench", unit="case")
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        progress = cases
    for label, case in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{label} N={case.n} {case.mode} {case.method}")
        try:
            row = run_isolated(case, args.timeout) if isolate else run_case(case)
        except RuntimeError as err:  # e.g. CUDA out of memory: record it and go on
            row = {"method": case.method, "mode": case.mode, "n": case.n, "error": str(err)[:300]}
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        row["label"] = label
        rows.append(row)
    add_ratios(rows)
    table = markdown_table(rows)
    print(table)
    meta = meta_info(args)
    write_json(rows, meta, out_dir / "bench.json")
    (out_dir / "bench.md").write_text(table)
    title = (
        f"MiTA vs SDPA, B={args.batch} H={args.heads} d={args.dim} m={args.landmarks} k={args.topk} "
        f"{args.dtype} on {meta.get('gpu', meta['processor'])} ({args.device})"
    )
    plotted = write_plot(rows, out_dir / "bench.png", title)
    print(
        f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
        + (f", {out_dir / 'bench.png'}" if plotted else "")
    )
    return 0
