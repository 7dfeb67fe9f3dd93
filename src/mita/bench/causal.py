"""``mita bench --causal`` and ``mita bench --decode``: causal MiTA against SDPA in the same run.

``--causal``: forward and forward+backward of :func:`mita.mita_causal_attention` (torch backend, each
horizon; ``--backends torch,cpu`` adds the ``cpu`` backend, frozen horizon only, as ``mita-frozen-cpu``)
against ``F.scaled_dot_product_attention(is_causal=True)``. The methods are interleaved rep by rep (best
time of each is kept), so a busy machine slows them alike; ratios are SDPA time / MiTA time.

``--decode``: one new token at a given context: :class:`mita.MiTACache` (prefilled with ``context``
tokens, chunked) against dense decoding over the same K/V cache (SDPA with one query over a
preallocated K/V buffer). Each of ``--reps`` rounds (after one warm-up round) times ``--tokens``
consecutive tokens (default one block, so one block completion is included and amortised); dense and
MiTA steps alternate token by token. Reported: the best round's mean per token, and the median single
token. Also the cache's memory: K/V bytes and the extra bytes (landmarks, states, top-k) as % of K/V.
"""

from __future__ import annotations

import argparse
import platform
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..deps import available
from ..io import write_json, write_text
from ..landmarks import block_mean
from ..ops import MiTACache, mita_causal_attention
from ..system import cpu_model, parse_int_list
from .report import format_gflops
from .timing import SLOW_CALL_S, time_call

DEFAULT_NS = "1024,2048,4096,8192,16384,32768,65536"
DEFAULT_CONTEXTS = "4096,16384,65536,262144"


class BadArgument(SystemExit):
    """A bad option: ``main`` prints it as one line and the command exits with code 2 (as argparse and the
    other bench modes do); ``str()`` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mita bench --causal | --decode", description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--causal", action="store_true", help="causal op, fwd and fwd+bwd, vs SDPA causal")
    what.add_argument("--decode", action="store_true", help="per-token decoding with MiTACache vs dense")
    p.add_argument("--n", default=None, help=f"sequence lengths (--causal; default {DEFAULT_NS})")
    p.add_argument("--context", default=DEFAULT_CONTEXTS, help="contexts (--decode; default %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="k/v heads (GQA; default = heads)")
    p.add_argument("--head-dim", dest="dim", metavar="D", type=int, default=32, help="head dimension d")
    p.add_argument("--block-size", type=int, default=64, help="b")
    p.add_argument("--topk", type=int, default=64, help="k")
    p.add_argument("--horizons", default="prefix,frozen", help="landmark horizons to measure")
    p.add_argument(
        "--backends", default="torch",
        help="--causal: MiTA backends, torch and/or cpu (frozen horizon only: 'mita-frozen-cpu')",
    )  # fmt: skip
    p.add_argument("--modes", default="fwd,fwdbwd", help="--causal: fwd and/or fwdbwd")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--reps", type=int, default=3, help="--causal: interleaved repetitions (best is kept)")
    p.add_argument("--tokens", type=int, default=None, help="--decode: tokens timed (default one block)")
    p.add_argument("--sdpa-max-n", type=int, default=None, help="--causal: skip SDPA above this N")
    p.add_argument("--out", default=None, help="output directory (default bench_out/causal or /decode)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (0 or default: torch's choice)"
    )
    return p


def _ints(text: str, name: str) -> list[int]:
    try:
        return parse_int_list(text, name)
    except ValueError as err:
        raise BadArgument(str(err)) from None


def _check(args: argparse.Namespace) -> None:
    flags = {"batch": "--batch", "heads": "--heads", "dim": "--head-dim", "block_size": "--block-size",
             "topk": "--topk", "reps": "--reps"}  # fmt: skip
    for name, flag in flags.items():
        if getattr(args, name) < 1:
            raise BadArgument(f"{flag} must be >= 1")
    hkv = args.kv_heads or args.heads
    if args.heads % hkv:
        raise BadArgument(f"--heads ({args.heads}) must be a multiple of --kv-heads ({hkv})")
    bad = set(args.horizons.split(",")) - {"prefix", "frozen"}
    if bad:
        raise BadArgument(f"unknown horizon(s) {sorted(bad)}; use prefix and/or frozen")
    bad = set(args.backends.split(",")) - {"torch", "cpu"}
    if bad:
        raise BadArgument(f"unknown backend(s) {sorted(bad)}; use torch and/or cpu")
    bad = set(args.modes.split(",")) - {"fwd", "fwdbwd"}
    if bad:
        raise BadArgument(f"unknown mode(s) {sorted(bad)}; use fwd and/or fwdbwd")
    if args.causal and all(b == "cpu" for b in args.backends.split(",")) and "frozen" not in args.horizons:
        raise BadArgument(
            "--backends cpu has the frozen horizon only, so --horizons prefix measures no MiTA; add "
            "frozen to --horizons or torch to --backends"
        )
    if args.threads is not None and args.threads < 0:
        raise BadArgument(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.tokens is not None and args.tokens < 1:
        raise BadArgument("--tokens must be >= 1")


def _plot_available(no_plot: bool) -> bool:
    """Checked before the work starts, so a missing matplotlib is known at once."""
    if no_plot:
        return False
    if not available("matplotlib"):
        print("matplotlib is not installed: no PNG will be written (pip install matplotlib)")
        return False
    return True


def causal_flops(n: int, d: int, dv: int, b: int, k: int, heads: int, batch: int, method: str) -> float:
    """Forward matmul FLOPs of each method's own work (backward counted as twice this by the caller).

    SDPA causal: ``N^2 (d + dv)`` per head (half of the ``2 N^2 (d + dv)`` square). Causal MiTA:
    ``2 N (d + dv) (2 n_l + k + b / 2)`` with ``n_l = N // b``: landmark scores and shared values over
    the keys (``n_l`` rows each), the landmark logits and shared output, the ``k`` routed keys, and
    half of the own block.
    """
    if method == "sdpa":
        per_head = float(n) * n * (d + dv)
    else:
        per_head = 2.0 * n * (d + dv) * (2 * (n // b) + k + b / 2)
    return per_head * heads * batch


def _meta(args: argparse.Namespace) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "args": vars(args),
        "note": "shared machine: other jobs may have run at the same time; the methods are interleaved",
    }


def _progress(items, desc: str):
    return tqdm(items, desc=desc, unit="case")


# --------------------------------------------------------------------------------------------- causal
def _causal_case(args: argparse.Namespace, n: int, mode: str) -> list[dict]:
    """All methods at one N and mode, interleaved rep by rep (best time kept)."""
    dtype = getattr(torch, args.dtype)
    hkv = args.kv_heads or args.heads
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwdbwd"
    q = torch.randn(args.batch, args.heads, n, args.dim, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(args.batch, hkv, n, args.dim, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(args.batch, hkv, n, args.dim, generator=g).to(dtype).requires_grad_(grad)
    up = torch.ones_like(q)
    methods = {}
    if args.sdpa_max_n is None or n <= args.sdpa_max_n:
        methods["sdpa"] = lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=hkv != args.heads
        )
    for hor in args.horizons.split(","):
        for backend in args.backends.split(","):
            if backend == "cpu" and hor != "frozen":
                continue  # the cpu backend has the frozen horizon only
            methods[f"mita-{hor}" + ("-cpu" if backend == "cpu" else "")] = lambda hor=hor, be=backend: (
                mita_causal_attention(
                    q, k, v, block_mean(q, args.block_size), topk=args.topk, block_size=args.block_size,
                    landmark_horizon=hor, backend=be,
                )
            )  # fmt: skip

    def step(fn) -> None:
        if grad:
            fn().backward(up)
            for t in (q, k, v):
                t.grad = None
        else:
            with torch.no_grad():
                fn()

    best = {name: float("inf") for name in methods}
    errors: dict[str, str] = {}
    for rep in range(args.reps + 1):  # rep 0 warms up (kept only for sizes slower than SLOW_CALL_S)
        for name, fn in methods.items():
            if name in errors:
                continue
            try:
                t = time_call(lambda fn=fn: step(fn))
            except RuntimeError as err:  # e.g. out of memory: record it and go on
                errors[name] = str(err)[:300]
                continue
            if rep > 0 or t > SLOW_CALL_S:
                best[name] = min(best[name], t)
        if rep == 0 and all(best[name] < float("inf") for name in methods if name not in errors):
            break  # every method took > SLOW_CALL_S: one run each is enough
    rows = []
    for name in methods:
        row = {"n": n, "mode": mode, "method": name}
        if name in errors:
            row["error"] = errors[name]
        else:
            kind = "sdpa" if name == "sdpa" else "mita"
            flops = causal_flops(
                n, args.dim, args.dim, args.block_size, args.topk, args.heads, args.batch, kind
            )
            flops *= 3 if grad else 1
            row.update(time_s=best[name], tflops=flops / best[name] / 1e12, gflops=flops / best[name] / 1e9)
            if kind == "mita" and "sdpa" in methods and "sdpa" not in errors:
                row["speedup_vs_sdpa"] = best["sdpa"] / best[name]
        rows.append(row)
    return rows


def _causal_rows(args: argparse.Namespace) -> list[dict]:
    cases = [(n, mode) for n in _ints(args.n or DEFAULT_NS, "--n") for mode in args.modes.split(",")]
    rows = []
    for n, mode in _progress(cases, "bench --causal"):
        rows += _causal_case(args, n, mode)
    return rows


def causal_table(rows: list[dict]) -> str:
    head = "| N | mode | method | time (ms) | GFLOP/s (own FLOPs) | speed-up vs SDPA causal |\n"
    head += "|---:|---|---|---:|---:|---:|\n"
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['mode']} | {r['method']} | — | — | {r['error']} |")
            continue
        ratio = "1.00x" if r["method"] == "sdpa" else "—"
        if "speedup_vs_sdpa" in r:
            ratio = f"{r['speedup_vs_sdpa']:.2f}x"
        cells = [r["n"], r["mode"], r["method"], f"{1000 * r['time_s']:,.1f}", format_gflops(r), ratio]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- decode
def _prefill(cache: MiTACache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int) -> None:
    for s in range(0, ctx, 8192):  # chunked
        e = min(ctx, s + 8192)
        cache.append(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])


def _dense_token(q, k, v, kbuf: torch.Tensor, vbuf: torch.Tensor, i: int) -> None:
    """Dense decoding of token ``i``: its K/V into the preallocated buffers, then SDPA with one query."""
    kbuf[:, :, i : i + 1], vbuf[:, :, i : i + 1] = k[:, :, i : i + 1], v[:, :, i : i + 1]
    F.scaled_dot_product_attention(
        q[:, :, i : i + 1], kbuf[:, :, : i + 1], vbuf[:, :, : i + 1], enable_gqa=kbuf.shape[1] != q.shape[1]
    )


def _decode_rows(args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    hkv = args.kv_heads or args.heads
    horizons = args.horizons.split(",")
    steps = args.tokens or args.block_size
    rounds = args.reps + 1  # round 0 warms up; each round times `steps` consecutive tokens
    rows = []
    for ctx in _progress(_ints(args.context, "--context"), "bench --decode"):
        g = torch.Generator().manual_seed(0)
        total = ctx + rounds * steps
        q = torch.randn(args.batch, args.heads, total, args.dim, generator=g).to(dtype)
        k = torch.randn(args.batch, hkv, total, args.dim, generator=g).to(dtype)
        v = torch.randn(args.batch, hkv, total, args.dim, generator=g).to(dtype)
        with torch.no_grad():
            caches, prefill_s = {}, {}
            for hor in horizons:
                cache = MiTACache(topk=args.topk, block_size=args.block_size, landmark_horizon=hor)
                prefill_s[hor] = time_call(partial(_prefill, cache, q, k, v, ctx))
                caches[hor] = cache
            kbuf, vbuf = torch.empty_like(k), torch.empty_like(v)
            kbuf[:, :, :ctx], vbuf[:, :, :ctx] = k[:, :, :ctx], v[:, :, :ctx]
            names = ["dense", *horizons]
            per_round = {name: [] for name in names}  # mean seconds per token of each timed round
            single = {name: [] for name in names}
            for rnd in range(rounds):
                times = {name: [] for name in names}
                for i in range(ctx + rnd * steps, ctx + (rnd + 1) * steps):  # alternate token by token
                    times["dense"].append(time_call(partial(_dense_token, q, k, v, kbuf, vbuf, i)))
                    for hor in horizons:
                        token = (q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1])
                        times[hor].append(time_call(partial(caches[hor].append, *token)))
                if rnd > 0 or rounds == 1:
                    for name in names:
                        per_round[name].append(sum(times[name]) / steps)
                        single[name] += times[name]
        best = {name: min(per_round[name]) for name in names}
        med = {name: sorted(single[name])[len(single[name]) // 2] for name in names}
        kv_bytes = 2 * k[:, :, :ctx].numel() * k.element_size()
        rows.append({"context": ctx, "method": "dense", "ms_per_token": 1000 * best["dense"],
                     "ms_per_token_median": 1000 * med["dense"], "kv_bytes": kv_bytes})  # fmt: skip
        for hor in horizons:
            mem = caches[hor].memory()
            rows.append({
                "context": ctx, "method": f"mita-{hor}", "ms_per_token": 1000 * best[hor],
                "ms_per_token_median": 1000 * med[hor], "ms_max": 1000 * max(single[hor]),
                "speedup_vs_dense": best["dense"] / best[hor],
                "speedup_median_vs_dense": med["dense"] / med[hor], "prefill_s": prefill_s[hor],
                "kv_bytes": mem["kv_bytes"], "extra_bytes": mem["extra_bytes"],
                "extra_pct_of_kv": 100 * mem["extra_fraction"],
            })  # fmt: skip
    return rows


def decode_table(rows: list[dict]) -> str:
    head = "| context | method | ms / token (mean) | median | max | speed-up vs dense | K/V MiB | extra MiB "
    head += "| extra % of K/V |\n"
    head += "|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        mib = r["kv_bytes"] / 2**20
        if r["method"] == "dense":
            cells = [r["context"], "dense (SDPA, 1 query)", f"{r['ms_per_token']:.3f}",
                     f"{r['ms_per_token_median']:.3f}", "—", "1.00x", f"{mib:,.1f}", "0", "0"]  # fmt: skip
        else:
            cells = [r["context"], r["method"], f"{r['ms_per_token']:.3f}", f"{r['ms_per_token_median']:.3f}",
                     f"{r['ms_max']:.2f}", f"{r['speedup_vs_dense']:.1f}x", f"{mib:,.1f}",
                     f"{r['extra_bytes'] / 2**20:,.2f}", f"{r['extra_pct_of_kv']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, decode: bool, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    if decode:
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["context"], r) for r in rows if r["method"] == method)
            ax_t.plot([c for c, _ in pts], [r["ms_per_token"] for _, r in pts], marker="o", label=method)
            if method != "dense":
                ax_s.plot(
                    [c for c, _ in pts], [r["speedup_vs_dense"] for _, r in pts], marker="o", label=method
                )
        ax_t.set(xscale="log", yscale="log", xlabel="context", ylabel="ms per token", title="decode latency")
        ax_s.set(xscale="log", yscale="log", xlabel="context", ylabel="dense time / MiTA time")
    else:
        styles = {"fwd": "--", "fwdbwd": "-"}
        for method in sorted({r["method"] for r in rows}):
            for mode in ("fwd", "fwdbwd"):
                pts = sorted(
                    (r["n"], r) for r in rows if r["method"] == method and r["mode"] == mode and "time_s" in r
                )
                if not pts:
                    continue
                ns = [n for n, _ in pts]
                ax_t.plot(
                    ns,
                    [1000 * r["time_s"] for _, r in pts],
                    styles[mode],
                    marker="o",
                    label=f"{method} {mode}",
                )
                sp = [(n, r["speedup_vs_sdpa"]) for n, r in pts if "speedup_vs_sdpa" in r]
                if sp:
                    ax_s.plot(*zip(*sp), styles[mode], marker="o", label=f"{method} {mode}")
        ax_t.set(xscale="log", yscale="log", xlabel="N", ylabel="time (ms)", title="time")
        ax_s.set(xscale="log", yscale="log", xlabel="N", ylabel="SDPA causal time / MiTA time")
    ax_s.axhline(1.0, color="gray", lw=0.8)
    ax_s.set_title("speed-up (same run)")
    for ax in (ax_t, ax_s):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        if args.n is not None:
            _ints(args.n, "--n")
        _ints(args.context, "--context")
    except BadArgument as err:
        print(f"mita bench: {err}", file=sys.stderr)
        raise
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "decode" if args.decode else "causal"
    out_dir = Path(args.out or f"bench_out/{name}")
    plot = _plot_available(args.no_plot)
    rows = _decode_rows(args) if args.decode else _causal_rows(args)
    table = decode_table(rows) if args.decode else causal_table(rows)
    meta = _meta(args)
    print(f"CPU: {meta['cpu']}, torch {meta['torch']}, {meta['cpu_threads']} threads ({meta['note']})")
    print(table)
    write_json(out_dir / f"{name}.json", {"meta": meta, "results": rows})
    write_text(out_dir / f"{name}.md", table)
    written = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    if plot:
        against = "dense decoding" if args.decode else "SDPA causal"
        title = (
            f"causal MiTA vs {against}, B={args.batch} H={args.heads} d={args.dim} b={args.block_size} "
            f"k={args.topk} {args.dtype} on {meta['cpu']}"
        )
        _plot(rows, out_dir / f"{name}.png", args.decode, title)
        written.append(out_dir / f"{name}.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
