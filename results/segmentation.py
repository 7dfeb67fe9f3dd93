"""Semantic segmentation of Fashion-MNIST scenes: a MiTA Segmenter next to full and Agent attention.

Trains each variant with the ``seg-fmnist`` preset (128 x 128 scenes, patch 4: 1,024 patch tokens + cls;
m = k = 49 in the encoder) for each seed, and reads mIoU, pixel accuracy, throughput and peak memory from
the runs' ``summary.json``; then short runs on a larger canvas (default 256 x 256: 4,096 tokens) measure
training and evaluation throughput only. Writes ``results/segmentation.md`` and ``results/segmentation.json``.

Variants: ``full``; ``mita`` (MiTA in the encoder, full attention in the one-layer decoder);
``mita-dec`` (MiTA in the encoder and the decoder, the class embeddings as suffix tokens); ``agent``.

    python results/segmentation.py                          # 4 variants x 2 seeds, then 4,096 tokens
    python results/segmentation.py --seeds 0 --max-steps 50 # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from mita.io import markdown_table, write_json, write_text
from mita.system import hardware
from mita.train.report import pct, run_all, train_args

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "full": ["--attention", "full"],
    "mita": ["--attention", "mita"],
    "mita-dec": ["--attention", "mita", "--model-arg", "decoder_attention=mita"],
    "agent": ["--attention", "agent"],
}
LABELS = {
    "full": "full",
    "mita": "MiTA (encoder; m = k = 49)",
    "mita-dec": "MiTA (encoder + decoder; m = k = 49)",
    "agent": "Agent (m = 49)",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument(
        "--single-seed", default="", help="comma-separated variants trained with the first seed only (budget)"
    )
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps per run (default: the preset's)")
    p.add_argument("--test-size", type=int, default=500, help="test scenes per evaluation (default 500)")
    p.add_argument("--speed-canvas", type=int, default=256, help="canvas of the throughput runs (0: none)")
    p.add_argument("--speed-steps", type=int, default=6, help="optimizer steps of each throughput run")
    p.add_argument("--speed-batch", type=int, default=2, help="batch size of the throughput runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", help="Fashion-MNIST directory (default: the Debian package's)")
    p.add_argument("--runs", default="runs/results-segmentation", help="where the runs' directories go")
    p.add_argument("--out", default=str(HERE / "segmentation"), help="output stem: STEM.md and STEM.json")
    p.add_argument("--resume", action="store_true", help="continue (or re-report) the runs in --runs")
    p.add_argument("--fresh", action="store_true", help="train again: delete earlier runs in --runs")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (CPU threads split between them)")
    return p.parse_args(argv)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _commands(args: argparse.Namespace, variants: list[str], seeds: list[int]) -> dict[tuple, list[str]]:
    """``(kind, variant, seed) -> mita train arguments`` for the quality runs and the throughput runs."""
    runs, switches = Path(args.runs), {"--resume": args.resume, "--no-progress": True}
    common = {"--task": "fmnist-seg", "--device": args.device, "--data-root": args.data_root}
    cmds = {}
    single = {v.strip() for v in args.single_seed.split(",") if v.strip()}
    for variant in variants:
        for seed in seeds[:1] if variant in single else seeds:
            opts = {
                **common, "--seed": seed, "--out": runs / f"{variant}-s{seed}", "--max-steps": args.max_steps,
                "--test-size": args.test_size, "--eval-batch-size": 32,
            }  # fmt: skip
            cmds[("quality", variant, seed)] = train_args(opts, switches) + VARIANTS[variant]
    if args.speed_canvas:
        for variant in variants:
            opts = {
                **common, "--seed": 0, "--out": runs / f"speed-{variant}-c{args.speed_canvas}",
                "--max-steps": args.speed_steps, "--batch-size": args.speed_batch, "--test-size": 8,
                "--eval-batch-size": args.speed_batch, "--data-arg": f"canvas={args.speed_canvas}",
            }  # fmt: skip
            cmds[("speed", variant, 0)] = train_args(opts, switches) + VARIANTS[variant]
    return cmds


def quality_table(summaries: dict[tuple, dict], variants: list[str], seeds: list[int]) -> tuple[str, dict]:
    """The 1,024-token table (means over seeds, per-seed mIoU) and the per-variant figures."""
    rows, figures = [], {}
    for variant in variants:
        runs = [summaries[("quality", variant, s)] for s in seeds if ("quality", variant, s) in summaries]
        if not runs:
            continue
        f = {
            "miou": _mean([r["test_miou"] for r in runs]),
            "miou_seeds": [r["test_miou"] for r in runs],
            "pixel_accuracy": _mean([r["test_pixel_accuracy"] for r in runs]),
            "train_samples_per_s": _mean([r["train_samples_per_s"] for r in runs]),
            "eval_samples_per_s": _mean([r["eval_samples_per_s"] for r in runs]),
            "peak_memory_mib": max(r["peak_memory_bytes"] for r in runs) / 2**20,
            "steps": runs[0]["steps"],
            "num_params": runs[0]["num_params"],
        }
        figures[variant] = f
        full = figures.get("full", {}).get("miou")
        delta = "—" if full is None or variant == "full" else f"{100 * (f['miou'] - full):+.2f}"
        rows.append(
            [
                LABELS[variant], pct(f["miou"]), " / ".join(pct(v) for v in f["miou_seeds"]), delta,
                pct(f["pixel_accuracy"]), f["steps"], f"{f['train_samples_per_s']:.2f}",
                f"{f['eval_samples_per_s']:.1f}", f"{f['peak_memory_mib']:.0f}",
                f"{f['num_params'] / 1e6:.3f}",
            ]
        )  # fmt: skip
    any_run = next((r for k, r in summaries.items() if k[0] == "quality"), None)
    if any_run is not None:
        base = (any_run.get("baseline_miou"), any_run.get("baseline_pixel_accuracy"))
        rows.append(["all background", pct(base[0]), "", "", pct(base[1]), 0, "", "", "", ""])
        figures["all-background"] = {"miou": base[0], "pixel_accuracy": base[1]}
    headers = [
        "attention", "mIoU %", "mIoU % per seed", "Δ vs full", "pixel acc %", "steps", "train samples/s",
        "eval samples/s", "peak MiB", "params M",
    ]  # fmt: skip
    return markdown_table(headers, rows), figures


def speed_table(summaries: dict[tuple, dict], variants: list[str]) -> tuple[str, dict]:
    """The large-canvas throughput table (ratios to full attention)."""
    rows, figures = [], {}
    full = summaries.get(("speed", "full", 0))
    for variant in variants:
        r = summaries.get(("speed", variant, 0))
        if r is None:
            continue
        ratio = r["train_samples_per_s"] / full["train_samples_per_s"] if full else None
        eval_ratio = r["eval_samples_per_s"] / full["eval_samples_per_s"] if full else None
        tokens = (r["model_kwargs"]["img_size"] // r["model_kwargs"]["patch_size"]) ** 2
        figures[variant] = {
            "tokens": tokens,
            "train_samples_per_s": r["train_samples_per_s"],
            "eval_samples_per_s": r["eval_samples_per_s"],
            "train_speedup_vs_full": ratio,
            "eval_speedup_vs_full": eval_ratio,
            "peak_memory_mib": r["peak_memory_bytes"] / 2**20,
            "steps": r["steps"],
        }
        rows.append(
            [
                LABELS[variant], tokens, f"{r['train_samples_per_s']:.3f}",
                "—" if ratio is None else f"{ratio:.2f}x", f"{r['eval_samples_per_s']:.2f}",
                "—" if eval_ratio is None else f"{eval_ratio:.2f}x", f"{r['peak_memory_bytes'] / 2**20:.0f}",
            ]
        )  # fmt: skip
    headers = [
        "attention",
        "patch tokens",
        "train samples/s",
        "vs full",
        "eval samples/s",
        "vs full",
        "peak MiB",
    ]
    return markdown_table(headers, rows), figures


def goals(quality: dict, speed: dict) -> list[str]:
    """The two goals, each met or not, in words."""
    out = []
    full = quality.get("full", {}).get("miou")
    for variant in ("mita", "mita-dec"):
        if full is not None and variant in quality:
            gap = 100 * (full - quality[variant]["miou"])
            met = "met" if gap <= 1.0 else "not met"
            out.append(
                f"- {LABELS[variant]} within 1 mIoU point of full at equal steps: {met} (gap {gap:+.2f})"
            )
    for variant in ("mita", "mita-dec"):
        ratio = speed.get(variant, {}).get("train_speedup_vs_full")
        if ratio is not None:
            met = "met" if ratio >= 2.0 else "not met"
            tokens = speed[variant]["tokens"]
            what = f"2x full's training throughput at {tokens:,} tokens"
            out.append(f"- {LABELS[variant]} >= {what}: {met} ({ratio:.2f}x)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(
            f"results/segmentation.py: unknown variants {unknown}; choose from {', '.join(VARIANTS)}"
        )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    cmds = _commands(args, variants, seeds)
    outs = [Path(c[c.index("--out") + 1]) for c in cmds.values()]
    taken = [out for out in outs if out.exists()]
    if taken and args.fresh:
        for out in taken:
            shutil.rmtree(out)
    elif taken and not args.resume:  # say so now, not from inside a training subprocess
        raise SystemExit(
            f"results/segmentation.py: {', '.join(map(str, taken))} already hold runs; pass --resume to "
            "continue (or re-report) them, --fresh to train again, or --runs DIR for a new place"
        )
    summaries = run_all(cmds, args.jobs)
    qtable, quality = quality_table(summaries, variants, seeds)
    stable, speed = speed_table(summaries, variants)
    first = next(iter(summaries.values()))
    hw = hardware(torch.device(first["hardware"]["device"]))
    hw["torch_threads"] = first["hardware"].get("torch_threads", "?")
    total_min = (time.perf_counter() - t_start) / 60
    gpu = f", GPU {hw['gpu']}" if "gpu" in hw else ""
    steps = first["recipe"]["total_steps"] if args.max_steps is None else args.max_steps
    md = "\n".join(
        [
            "# Semantic segmentation of Fashion-MNIST scenes: MiTA Segmenter vs. full and Agent attention",
            "",
            "Generated by `python results/segmentation.py "
            + " ".join(sys.argv[1:] if argv is None else argv)
            + "`.",
            "Model: preset `seg-fmnist` (Segmenter: ViT encoder 64 x 4, 2 heads, patch 4, cls token;",
            "one-layer mask transformer decoder), 128 x 128 scenes of 2-5 Fashion-MNIST items = 1,024 patch",
            f"tokens + cls; the same weights for every kind. {steps} steps of batch "
            f"{first['recipe']['batch_size']} per run, seeds {', '.join(map(str, seeds))};",
            f"mIoU over the first {args.test_size} test scenes (background + 10 classes,",
            "one confusion matrix over all their pixels)."
            + (f" Budget cut: {args.single_seed} with seed {seeds[0]} only." if args.single_seed else ""),
            "Throughputs and peak memory (peak RSS) are per run; other jobs shared the CPU (see docs).",
            "",
            "## 1,024 tokens (128 x 128): quality, throughput, memory",
            "",
            qtable,
            "",
            f"## {args.speed_canvas} x {args.speed_canvas} canvas: throughput only",
            "",
            f"{args.speed_steps} steps of batch {args.speed_batch} per kind (the first step included).",
            "",
            stable if speed else "(not measured)",
            "",
            "## Goals",
            "",
            *goals(quality, speed),
            "",
            f"Total wall time {total_min:.1f} min. Hardware: {hw.get('cpu', '?')} "
            f"({hw.get('cpu_count', '?')} CPUs, {hw.get('torch_threads', '?')} torch threads){gpu}; "
            f"torch {torch.__version__}; {hw.get('platform', '')}.",
            "",
        ]
    )
    write_text(f"{args.out}.md", md)
    records = [{"kind": k[0], "variant": k[1], "seed": k[2], **s} for k, s in summaries.items()]
    doc = {
        "quality": quality,
        "speed": speed,
        "runs": records,
        "hardware": hw,
        "total_wall_time_s": total_min * 60,
    }
    write_json(f"{args.out}.json", doc, default=str)
    print(md)
    print(f"wrote {args.out}.md and {args.out}.json ({total_min:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
