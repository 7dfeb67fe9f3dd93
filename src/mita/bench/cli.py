"""Command line of ``mita bench``."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..deps import available
from ..io import write_json, write_text
from ..ops import triton_available
from ..ops.api import cpu_available
from ..system import cpu_model, parse_int_list, resolve_device
from .causal import main as causal_main
from .measure import Case, run_case, run_isolated
from .report import add_ratios, bench_table, write_plot

DEFAULT_NS = "1024,2048,4096,8192,16384,32768,65536"
MITA_BACKENDS = ("torch", "cpu", "triton", "reference")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mita bench",
        description=__doc__,
        epilog="Writes bench.json, bench.md and bench.png to --out (the PNG needs matplotlib; without it a "
        "note says so at the start and the PNG is skipped). Bad options: one line on stderr, exit 2.",
    )
    p.add_argument("--n", default=DEFAULT_NS, help="comma-separated sequence lengths (default %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", dest="dim", metavar="D", type=int, default=32, help="head dimension d")
    p.add_argument("--num-landmarks", dest="landmarks", type=int, default=64, help="m")
    p.add_argument("--topk", type=int, default=64, help="k")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if available)")
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated MiTA backends from {', '.join(MITA_BACKENDS)}; default torch plus the "
        "compiled backend of the device (cpu on CPU when it builds, triton on CUDA when available)",
    )
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per case (default: torch's default)")
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
        if triton_available()[0]:
            names.append("triton")
    else:
        if cpu_available()[0]:
            names.append("cpu")
    return names


def _cases(args: argparse.Namespace) -> list[tuple[str, Case]]:
    methods = ["sdpa"] + [f"mita-{b}" for b in _backends(args)]
    modes = [m.strip() for m in args.modes.split(",")]
    common = dict(dtype=args.dtype, device=args.device, reps=args.reps, threads=args.threads)
    out = []
    for n in parse_int_list(args.n, "--n"):
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
        raise ValueError(f"--vision must be batch,heads,head-dim (three integers), got {text!r}") from None
    if min(b, h, d) < 1:
        raise ValueError(f"--vision sizes must be positive, got {text!r}")
    return b, h, d


def _validate(args: argparse.Namespace) -> None:
    """Every option checked before any work; ValueError naming the option."""

    args.device = str(resolve_device(args.device))
    sizes = {"--batch": args.batch, "--heads": args.heads, "--head-dim": args.dim,
             "--num-landmarks": args.landmarks, "--topk": args.topk, "--reps": args.reps}  # fmt: skip
    for flag, value in sizes.items():
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if not args.no_vision:
        _vision_shape(args.vision)
    ns = parse_int_list(args.n, "--n")
    if min(ns) < max(args.landmarks, args.topk):
        raise ValueError(f"every N must be >= m ({args.landmarks}) and k ({args.topk})")
    bad = set(args.modes.split(",")) - {"fwd", "fwdbwd"}
    if bad:
        raise ValueError(f"unknown mode(s) {sorted(bad)}; use fwd and/or fwdbwd")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    for name in _backends(args):
        _check_backend(name, args.device)


def _check_backend(name: str, device: str) -> None:
    if name not in MITA_BACKENDS:
        raise ValueError(f"--backends: unknown backend {name!r}; choose from {', '.join(MITA_BACKENDS)}")
    if name == "triton":
        if not device.startswith("cuda"):
            raise ValueError("--backends triton needs --device cuda (the Triton kernels run on GPUs)")
        ok, why = triton_available()
        if not ok:
            raise ValueError(f"--backends triton is unavailable here: {why}")
    if name == "cpu":
        if device != "cpu":
            raise ValueError("--backends cpu needs --device cpu (the cpu backend runs on the CPU)")
        ok, why = cpu_available()
        if not ok:
            raise ValueError(f"--backends cpu is unavailable here: {why}")


def _check_out(out_dir: Path) -> None:
    """Fail before the work, not after it, when --out cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = write_text(out_dir / ".mita-bench-write-test", "")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {str(out_dir)!r} is not writable: {err.strerror or err}") from None


def _plot_available() -> bool:
    return available("matplotlib")


def meta_info(args: argparse.Namespace) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_threads": args.threads or torch.get_num_threads(),
        "device": args.device,
        "command": "mita bench " + " ".join(getattr(args, "argv", [])),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton  # noqa: PLC0415

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if "--causal" in raw or "--decode" in raw:
        return causal_main(raw)
    args = _parser().parse_args(argv)
    args.argv = raw  # recorded with the results, to rerun them exactly
    out_dir = Path(args.out)
    try:
        _validate(args)
        _check_out(out_dir)
    except ValueError as err:
        print(f"mita bench: {err}", file=sys.stderr)
        return 2
    plot = _plot_available()
    if not plot:
        print(
            "mita bench: matplotlib is not installed, so bench.png will be skipped (pip install matplotlib)"
        )
    isolate = not args.in_process and not args.device.startswith("cuda")
    rows = []
    cases = _cases(args)
    progress = tqdm(cases, desc="bench", unit="case")
    for label, case in progress:
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
    meta = meta_info(args)
    table = bench_table(rows, meta)
    print(table)
    write_json(out_dir / "bench.json", {"meta": meta, "results": rows})
    write_text(out_dir / "bench.md", table)
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    if plot:
        title = (
            f"MiTA vs SDPA, B={args.batch} H={args.heads} d={args.dim} m={args.landmarks} k={args.topk} "
            f"{args.dtype} on {meta.get('gpu', meta['processor'])} ({args.device})"
        )
        if write_plot(rows, out_dir / "bench.png", title):
            written.append(out_dir / "bench.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
