"""Fashion-MNIST: the default MiTA ViT next to the same ViT with full attention (the README's main job).

Trains each attention kind with the ``vit-fmnist`` preset (197 tokens; MiTA m = k = 25), reloads the
saved weights, evaluates them on the 10k test images, and writes ``results/fmnist.md`` and
``results/fmnist.json`` with accuracy, throughput, wall time and the hardware. Budget flags
(``--epochs``, ``--max-steps``) cut the run; what was used is recorded in the table.

    python results/fmnist.py                      # preset length for mita and full
    python results/fmnist.py --max-steps 300      # a quick look
    python results/fmnist.py --attentions mita,mita:router=distill,full --seeds 0,1   # options, seeds

An attention entry ``KIND:KEY=VALUE[:KEY=VALUE...]`` trains ``KIND`` with those model keywords
(``mita train --model-arg KEY=VALUE``), in the run directory ``KIND-KEY=VALUE-sSEED``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from mita.io import markdown_table, write_json, write_text
from mita.system import hardware
from mita.train.checkpoint import load_model
from mita.train.evaluate import evaluate
from mita.train.report import attention_label, pct, run_all, train_args

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--attentions",
        default="mita,full",
        help="comma-separated attention kinds, each KIND or KIND:KEY=VALUE[:KEY=VALUE...] (model keywords)",
    )
    p.add_argument("--epochs", type=int, help="epochs per run (default: the preset's)")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps per run")
    p.add_argument("--train-size", type=int, help="train on the first N images only (budget cut)")
    p.add_argument("--test-size", type=int, help="evaluate on the first N test images only (quick checks)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="comma-separated seeds, each kind trained once per seed (not --seed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--data-root", help="Fashion-MNIST directory (default: the Debian package's)")
    p.add_argument("--runs", default="runs/results-fmnist", help="where the runs' directories go")
    p.add_argument("--out", default=str(HERE / "fmnist"), help="output stem: writes STEM.md and STEM.json")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs in --runs")
    p.add_argument("--fresh", action="store_true", help="train again: delete earlier runs in --runs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--reeval", action="store_true", help="re-evaluate the reloaded checkpoints")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many attention kinds at once, CPU threads split evenly between them",
    )
    return p.parse_args(argv)


def curve_table(records: list[dict]) -> str:
    """Markdown table: one row per run, one column per evaluation (epoch) logged in its metrics.jsonl."""
    curves = {}
    for r in records:
        path = Path(r["out"]) / "metrics.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        evals = [e for e in lines if e.get("event") == "eval"]
        curves[r["label"]] = {f"{e['epoch']:.2f}": e["test_accuracy"] for e in evals}
    epochs = sorted({e for c in curves.values() for e in c}, key=float)
    rows = [[name] + [pct(c.get(e)) for e in epochs] for name, c in curves.items()]
    return markdown_table(["attention"] + [f"epoch {e}" for e in epochs], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    rows, records = [], []
    attentions = [a.strip() for a in args.attentions.split(",") if a.strip()]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    keys = [(a, seed) for seed in seeds for a in attentions]
    outs = {(a, seed): Path(args.runs) / f"{a.replace(':', '-')}-s{seed}" for a, seed in keys}
    taken = [out for out in outs.values() if out.exists()]
    if taken and args.fresh:
        for out in taken:
            shutil.rmtree(out)
    elif taken and not args.resume:  # say so now, not from inside two training subprocesses
        raise SystemExit(
            f"results/fmnist.py: {', '.join(map(str, taken))} already hold runs; pass --resume to continue "
            "(or re-report) them, --fresh to train again, or --runs DIR for a new place"
        )
    switches = {"--resume": args.resume, "--amp": args.amp, "--no-progress": args.no_progress}
    cmds = {
        (attention, seed): train_args(
            {
                "--task": "fmnist",
                "--attention": attention.split(":")[0],
                "--seed": seed,
                "--out": outs[attention, seed],
                "--device": args.device,
                "--epochs": args.epochs,
                "--max-steps": args.max_steps,
                "--batch-size": args.batch_size,
                "--lr": args.lr,
                "--train-size": args.train_size,
                "--test-size": args.test_size,
                "--data-root": args.data_root,
            },
            switches,
        )  # fmt: skip
        + [x for option in attention.split(":")[1:] for x in ("--model-arg", option)]
        for attention, seed in keys
    }
    summaries = run_all(cmds, args.jobs)
    for attention, seed in keys:
        summary, out = summaries[attention, seed], outs[attention, seed]
        label = " ".join([attention_label(summary), *attention.split(":")[1:]])
        label += f" s{seed}" if len(seeds) > 1 else ""
        device = summary["hardware"]["device"]
        ev = {"test_accuracy": summary["test_accuracy"], "samples_per_s": summary["eval_samples_per_s"]}
        if args.reeval:  # evaluate the saved weights again (checks the checkpoint; costs one more pass)
            model, _ = load_model(out, device=device)
            data_kwargs = {"root": args.data_root} if args.data_root else {}
            ev = evaluate(model, "fmnist", device=device, amp=args.amp, data_kwargs=data_kwargs)
        record = {**summary, "out": str(out), "label": label, "reloaded_eval": ev if args.reeval else None}
        records.append(record)
        rows.append(
            [
                label,
                pct(ev["test_accuracy"]),
                pct(summary["best_test_accuracy"]),
                summary["steps"],
                f"{summary['epochs']:.2f}",
                f"{summary['train_samples_per_s']:.0f}",
                f"{ev['samples_per_s']:.0f}",
                f"{summary['wall_time_s'] / 60:.1f}",
                f"{summary['peak_memory_bytes'] / 2**20:.0f}",
                f"{summary['num_params'] / 1e6:.2f}",
            ]
        )
        print(f"{label}: test accuracy {pct(ev['test_accuracy'])}%", file=sys.stderr)
    hw = hardware(torch.device(records[0]["hardware"]["device"])) if records else {}
    if records:  # the threads the runs used, not this launcher's
        hw["torch_threads"] = records[0]["hardware"].get("torch_threads", "?")
    headers = [
        "attention",
        "test acc %",
        "best acc %",
        "steps",
        "epochs",
        "train samples/s",
        "eval samples/s",
        "wall min",
        "peak MiB",
        "params M",
    ]
    table = markdown_table(headers, rows)
    total_min = (time.perf_counter() - t_start) / 60
    cuts = []
    if args.epochs is not None:
        cuts.append(f"--epochs {args.epochs}")
    if args.max_steps is not None:
        cuts.append(f"--max-steps {args.max_steps}")
    if args.train_size is not None:
        cuts.append(f"--train-size {args.train_size}")
    if args.test_size is not None:
        cuts.append(f"--test-size {args.test_size}")
    gpu = f", GPU {hw['gpu']}" if "gpu" in hw else ""
    md = "\n".join(
        [
            "# Fashion-MNIST: MiTA ViT vs. full attention",
            "",
            "Generated by `python results/fmnist.py "
            + " ".join(sys.argv[1:] if argv is None else argv)
            + "`.",
            "Model: preset `vit-fmnist` (28x28, patch 2, 196 patches + cls = 197 tokens); "
            "the same weight shapes",
            "for every attention kind. `test acc`: the final weights on the "
            f"{min(args.test_size or 10_000, 10_000):,} test images;",
            "`best acc`: the best evaluation during training. Throughputs are pessimistic when other jobs",
            "shared the machine; peak memory is each run's peak RSS on CPU.",
            "",
            table,
            "",
            "Test accuracy % at each evaluation during training:",
            "",
            curve_table(records),
            "",
            f"Run length: {', '.join(cuts) or 'preset default'}; total wall time {total_min:.1f} min"
            + (
                f"; {args.jobs} runs trained at a time, {hw.get('torch_threads', '?')} torch "
                "thread(s) each (throughputs compare the kinds at equal threads)."
                if args.jobs > 1
                else "."
            ),
            f"Hardware: {hw.get('cpu', '?')} ({hw.get('cpu_count', '?')} CPUs, "
            f"{hw.get('torch_threads', '?')} torch threads){gpu}; torch {torch.__version__}; "
            f"{hw.get('platform', '')}.",
            "",
        ]
    )
    write_text(f"{args.out}.md", md)
    doc = {"runs": records, "hardware": hw, "total_wall_time_s": total_min * 60, "cuts": cuts}
    write_json(f"{args.out}.json", doc, default=str)
    print(table)
    print(f"wrote {args.out}.md and {args.out}.json ({total_min:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
