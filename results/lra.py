"""Long-range tasks across attention kinds with the paper's settings (m = k = 16 for MiTA, m = 32 for Agent).

Trains every (task, attention) pair with the task's ``lra-*`` preset (2 layers, width 64, 2 heads, MLP 128;
batch sizes and step counts of the Nystromformer/Skyformer LRA set-up), and writes ``results/lra.md`` and
``results/lra.json``: test accuracy next to the paper's numbers (SPEC §3), training/eval throughput,
wall time and hardware. Flags cut the runs for a CPU (fewer steps, fewer samples, shorter sequences);
every cut is recorded in the output.

    python results/lra.py                                      # the full table (GPU: hours)
    python results/lra.py --tasks listops --max-steps 200 --train-size 4000 --test-size 500 --seq-len 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mita.io import markdown_table, write_json, write_text
from mita.system import hardware
from mita.train.report import pct, run_all, train_args

HERE = Path(__file__).resolve().parent
TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
# SPEC §3, the paper's Table (full attention = "Standard"), in percent
PAPER = {
    "full": {"listops": 37.10, "text": 65.02, "retrieval": 80.11, "image": 40.45, "pathfinder": 74.16},
    "agent": {"listops": 37.15, "text": 64.41, "retrieval": 79.75, "image": 38.17, "pathfinder": 72.57},
    "mita": {"listops": 37.20, "text": 63.24, "retrieval": 79.37, "image": 42.19, "pathfinder": 74.32},
}
SEQ_LEN_TASKS = ("listops", "text", "retrieval")  # tasks whose sequence length can be cut


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--attentions", default="full,agent,mita")
    p.add_argument("--max-steps", type=int, help="cap optimizer steps (preset: 5k-62k)")
    p.add_argument("--train-size", type=int, help="train on the first N examples only")
    p.add_argument("--test-size", type=int, help="evaluate on the first N test examples only")
    p.add_argument("--seq-len", type=int, help=f"shorter sequences for {', '.join(SEQ_LEN_TASKS)}")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--cache-dir")
    p.add_argument("--runs", default="runs/results-lra")
    p.add_argument("--out", default=str(HERE / "lra"), help="output stem: writes STEM.md and STEM.json")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once, CPU threads split evenly between them",
    )
    return p.parse_args(argv)


def cuts_of(args: argparse.Namespace) -> list[str]:
    """The flags that make this run differ from the paper's settings."""
    names = ("max_steps", "train_size", "test_size", "seq_len", "batch_size")
    return [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in names if getattr(args, n) is not None]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    attentions = [a for a in args.attentions.split(",") if a]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {TASKS}")
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict]] = {a: {} for a in attentions}
    cmds: dict[tuple[str, str], list[str]] = {}
    for task in tasks:
        for attention in attentions:
            cmd = train_args(
                {"--task": task, "--attention": attention, "--seed": args.seed,
                 "--out": Path(args.runs) / f"{task}-{attention}-s{args.seed}", "--device": args.device,
                 "--max-steps": args.max_steps, "--batch-size": args.batch_size,
                 "--cache-dir": args.cache_dir, "--train-size": args.train_size,
                 "--test-size": args.test_size, "--eval-every": args.eval_every},
                {"--resume": args.resume, "--amp": args.amp, "--no-progress": args.no_progress},
            )  # fmt: skip
            if args.seq_len and task in SEQ_LEN_TASKS:
                cmd += ["--data-arg", f"seq_len={args.seq_len}"]
            cmds[task, attention] = cmd
    # one process per run: its own peak memory
    for (task, attention), summary in run_all(cmds, args.jobs).items():
        results[attention][task] = summary
        print(f"{task}/{attention}: test accuracy {pct(summary['test_accuracy'])}%", file=sys.stderr)
    run_hw = results[attentions[0]][tasks[0]]["hardware"]
    hw = hardware(torch.device(run_hw["device"]))
    threads = run_hw.get("torch_threads", "?")
    acc_rows, speed_rows = [], []
    for attention in attentions:
        accs = [results[attention][t]["test_accuracy"] for t in tasks]
        paper = [PAPER.get(attention, {}).get(t) for t in tasks]
        acc_rows.append(
            [attention]
            + [f"{pct(a)} ({p:.2f})" if p is not None else pct(a) for a, p in zip(accs, paper)]
            + [pct(sum(accs) / len(accs))]
        )
        runs = [results[attention][t] for t in tasks]
        speed_rows.append(
            [attention] + [f"{r['train_samples_per_s']:.0f} / {r['eval_samples_per_s']:.0f}" for r in runs]
        )
    steps = {t: results[attentions[0]][t]["steps"] for t in tasks}
    cuts = cuts_of(args)
    total_min = (time.perf_counter() - t0) / 60
    md = "\n".join(
        [
            "# Long-range tasks: full attention, Agent and MiTA",
            "",
            "Generated by `python results/lra.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`.",
            "Settings: presets `lra-*` (2 layers, width 64, 2 heads, MLP 128; MiTA m = k = 16, Agent m = 32,",
            "no DWC), as the paper. Cells: our test accuracy % (the paper's number in parentheses).",
            "",
            markdown_table(["attention", *tasks, "avg"], acc_rows),
            "",
            "Training / evaluation throughput (samples/s):",
            "",
            markdown_table(["attention", *tasks], speed_rows),
            "",
            f"Steps per run: {', '.join(f'{t} {s}' for t, s in steps.items())}.",
            f"Cuts from the paper's settings: {', '.join(cuts) if cuts else 'none'}."
            + (
                " With these cuts the numbers test the pipeline; they are not a reproduction." if cuts else ""
            ),
            f"Total wall time {total_min:.1f} min on {hw.get('cpu', '?')} ({hw.get('cpu_count', '?')} CPUs"
            + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
            + f"), torch {torch.__version__}"
            + (f"; {args.jobs} runs at a time, {threads} torch threads each." if args.jobs > 1 else "."),
            "",
        ]
    )
    write_text(f"{args.out}.md", md)
    doc = {"results": results, "paper": PAPER, "cuts": cuts, "hardware": hw,
           "total_wall_time_s": total_min * 60}  # fmt: skip
    write_json(f"{args.out}.json", doc, default=str)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
