"""Fine-tune a full-attention ViT into MiTA, Agent and linear attention: the paper's Table 3, cut to a CPU.

The paper (v2 Table 3) swaps the attention of ImageNet-21K timm ViTs and fine-tunes them on ImageNet-1K;
here a full-attention ``vit-fmnist`` ViT pretrained on Fashion-MNIST plays the pretrained model:

1. pretrain (unless ``--pretrained`` is given or the run exists): ``mita train --task fmnist --attention
   full --epochs E`` (``--pretrain-epochs``, default 1: the preset's 5 epochs are cut);
2. zero-shot: each kind's model (same preset, attention swapped, weights of step 1 loaded with
   :func:`mita.train.init_from.init_from`) evaluated on the 10,000 test images without any training;
3. fine-tune copies for the same budget (``--ft-epochs``, default 0.25 epoch) with each kind:
   ``mita train --task fmnist --attention KIND --init-from PRETRAINED --max-steps S --lr LR``, once
   training everything and once with ``--attn-only`` (attention, head and position embedding);
4. one table in the shape of Table 3 (zero-shot, fine-tuned, attn-only, gap to full, train throughput,
   wall time) in ``--out``.md and ``--out``.json, with the hardware.

    python results/finetune.py --jobs 2                      # about 40 min on 2 shared CPU cores
    python results/finetune.py --ft-epochs 0.05 --test-size 500 --runs /tmp/ft --out /tmp/ft  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mita.data import build_dataset, get_task
from mita.io import markdown_table, write_json, write_text
from mita.system import hardware
from mita.train.evaluate import evaluate
from mita.train.init_from import init_from
from mita.train.presets import build, get_preset, model_spec
from mita.train.report import pct, run_all, run_training, train_args

HERE = Path(__file__).resolve().parent
KINDS = ("full", "mita", "agent", "linear")
# v2 Table 3, ViT-T/S/B/L after 50 epochs of ImageNet-1K fine-tuning (top-1 %)
PAPER = {
    "full": (76.9, 81.2, 84.4, 85.9),
    "mita": (75.6, 80.9, 82.8, 85.5),
    "agent": (74.6, 79.7, 81.4, 83.5),
    "linear": (73.2, 78.6, 79.8, 80.7),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated attention kinds (full first)")
    p.add_argument("--pretrained", help="a full-attention run directory to start from (default: train one)")
    p.add_argument("--pretrain-epochs", type=int, default=1, help="epochs of the pretraining (preset: 5)")
    p.add_argument("--ft-epochs", type=float, default=0.25, help="fine-tuning budget per run, in epochs")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning peak learning rate (all kinds)")
    p.add_argument("--mita", default="25,25", help="MiTA m,k")
    p.add_argument("--agent-m", type=int, default=49, help="Agent attention's agents (7x7 on the 14x14 grid)")
    p.add_argument("--no-attn-only", action="store_true", help="skip the --attn-only fine-tunes")
    p.add_argument("--curve", action="store_true", help="also evaluate the full fine-tunes half-way")
    p.add_argument("--test-size", type=int, help="evaluate on the first N test images only (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="fine-tunes at a time (CPU threads split evenly)")
    p.add_argument("--runs", default="runs/finetune", help="where the run directories go")
    p.add_argument("--out", default=str(HERE / "finetune"), help="output stem: writes STEM.md and STEM.json")
    return p.parse_args(argv)


def attention_settings(kind: str, args: argparse.Namespace) -> dict[str, int]:
    if kind == "mita":
        m, k = (int(v) for v in args.mita.split(","))
        return {"num_landmarks": m, "topk": k}
    if kind == "agent":
        return {"num_landmarks": args.agent_m}
    return {}


def label(kind: str, settings: dict[str, int]) -> str:
    short = {"num_landmarks": "m", "topk": "k"}
    inner = ", ".join(f"{short[k]}={v}" for k, v in settings.items())
    return f"{kind} ({inner})" if inner else kind


@torch.no_grad()
def zero_shot(kind: str, settings: dict[str, int], pretrained: Path, test_set) -> dict:
    """Test accuracy of the pretrained weights with the attention swapped to ``kind``, before training."""
    preset = get_preset("fmnist")
    builder, kw = model_spec(preset, get_task("fmnist"), kind, settings)
    model = build(builder, kw)
    report = init_from(model, pretrained)
    ev = evaluate(model, test_set, batch_size=256)
    return {
        "test_accuracy": ev["test_accuracy"],
        "eval_samples_per_s": ev["samples_per_s"],
        "missing": report.missing,
        "unexpected": report.unexpected,
    }


def eval_curve(run_dir: Path) -> dict[str, float]:
    """``{epoch: test accuracy}`` of every evaluation a run logged."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {f"{e['epoch']:.2f}": e["test_accuracy"] for e in lines if e.get("event") == "eval"}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)  # the zero-shot evaluations share the machine with other jobs
    t_start = time.perf_counter()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "full" not in kinds:
        raise SystemExit("--kinds must include full (the reference of the gap column)")
    runs = Path(args.runs)
    common = {"--task": "fmnist", "--seed": args.seed, "--test-size": args.test_size}

    pretrained = Path(args.pretrained) if args.pretrained else runs / "pretrain-full"
    if not (pretrained / "summary.json").is_file():
        if args.pretrained:
            raise SystemExit(f"--pretrained {pretrained}: no finished run (summary.json) there")
        cmd = {**common, "--attention": "full", "--epochs": args.pretrain_epochs, "--out": pretrained}
        run_training(train_args(cmd, {"--no-progress": True}), threads=1)
    pre = json.loads((pretrained / "summary.json").read_text())
    print(f"pretrained: {pretrained} ({pct(pre['test_accuracy'])}% after {pre['epochs']:.2f} epochs)")

    test_set = build_dataset("fmnist", "test", size=args.test_size, augment=False)
    recipe = pre["recipe"]  # drop-last batches of the pretraining's size
    steps = max(1, int(args.ft_epochs * (recipe["train_size"] // recipe["batch_size"])))
    settings = {k: attention_settings(k, args) for k in kinds}
    zs = {}
    for kind in kinds:
        zs[kind] = zero_shot(kind, settings[kind], pretrained, test_set)
        print(f"zero-shot {label(kind, settings[kind])}: {pct(zs[kind]['test_accuracy'])}%", flush=True)

    cmds = {}
    for kind in kinds:
        attn = {"--num-landmarks": settings[kind].get("num_landmarks"), "--topk": settings[kind].get("topk")}
        for attn_only in (False,) if args.no_attn_only else (False, True):
            name = (kind, attn_only)
            out = runs / f"ft-{kind}{'-attn-only' if attn_only else ''}-s{args.seed}"
            opts = {**common, "--attention": kind, **attn, "--init-from": pretrained, "--max-steps": steps,
                    "--lr": args.lr, "--out": out,
                    # --curve: the full fine-tunes also evaluate half-way (an evaluation costs ~1/3 of a run)
                    "--eval-every": max(1, steps // 2) if args.curve and not attn_only else None}  # fmt: skip
            cmds[name] = train_args(opts, {"--attn-only": attn_only, "--no-progress": True})
    summaries = run_all(cmds, args.jobs)

    ft = {k: summaries[(k, False)] for k in kinds}
    ao = {k: summaries.get((k, True)) for k in kinds}
    ref = ft["full"]["test_accuracy"]
    rows, records = [], []
    for kind in kinds:
        s, a, paper = ft[kind], ao[kind], PAPER[kind]
        curve = eval_curve(Path(s["config"]["out"]))
        half = [pct(next(iter(curve.values())) if len(curve) > 1 else None)] if args.curve else []
        rows.append([
            label(kind, settings[kind]), pct(zs[kind]["test_accuracy"]), *half, pct(s["test_accuracy"]),
            pct(a["test_accuracy"]) if a else "—", f"{100 * (s['test_accuracy'] - ref):+.2f}",
            f"{100 * (a['test_accuracy'] - ref):+.2f}" if a else "—",
            f"{s['train_samples_per_s']:.0f}", f"{a['train_samples_per_s']:.0f}" if a else "—",
            f"{s['wall_time_s'] / 60:.1f}", f"{paper[0]:.1f} ({paper[0] - PAPER['full'][0]:+.1f})",
        ])  # fmt: skip
        records.append({"attention": kind, "settings": settings[kind], "zero_shot": zs[kind],
                        "fine_tuned": s, "fine_tuned_curve": curve, "attn_only": a,
                        "attn_only_curve": eval_curve(Path(a["config"]["out"])) if a else None,
                        "paper_table3": dict(zip(("vit_t", "vit_s", "vit_b", "vit_l"), paper))})  # fmt: skip
    hw = ft["full"]["hardware"]
    midway = [f"fine-tuned {args.ft_epochs / 2:g} ep %"] if args.curve else []
    headers = ["attention", "zero-shot %", *midway,
               f"fine-tuned {args.ft_epochs:g} ep %", "attn-only %", "gap to full", "attn-only gap",
               "train samples/s", "attn-only samples/s", "wall min", "paper ViT-T % (gap)"]  # fmt: skip
    table = markdown_table(headers, rows)
    total_min = (time.perf_counter() - t_start) / 60
    command = "python results/finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = "\n".join([
        "# Fine-tuning a full-attention ViT into other attentions (the paper's Table 3, cut)",
        "",
        f"Generated by `{command.strip()}`.",
        f"Pretrained: full attention, preset `vit-fmnist` (197 tokens), {pre['epochs']:.2f} epoch(s) "
        f"(`{pretrained}`): {pct(pre['test_accuracy'])} % test accuracy. Each kind then fine-tunes a copy "
        f"for {steps} steps ({args.ft_epochs:g} epoch, batch {pre['recipe']['batch_size']}), lr {args.lr:g} "
        "warm-up + cosine, fresh optimizer; `attn-only` trains only the attention, head and position "
        "embedding. Zero-shot: the swapped model before any training. Gaps are to the fine-tuned full "
        "attention; accuracies on "
        + (f"the first {args.test_size}" if args.test_size else "all 10,000")
        + " test images.",
        "",
        table,
        "",
        f"Runs: {args.jobs} at a time, {hw.get('torch_threads', '?')} torch thread(s) each, on a machine "
        "shared with other jobs (throughputs are pessimistic and noisy); "
        f"total wall time {total_min:.1f} min.",
        f"Hardware: {hw.get('cpu', '?')} ({hw.get('cpu_count', '?')} CPUs); torch {hw.get('torch', '?')}; "
        f"{hw.get('platform', '')}.",
        "",
    ])  # fmt: skip
    write_text(f"{args.out}.md", md)
    write_json(
        f"{args.out}.json",
        {"command": command, "pretrained": pre, "fine_tune_steps": steps, "lr": args.lr, "runs": records,
         "hardware": hw, "local_hardware": hardware(torch.device("cpu")),
         "total_wall_time_s": total_min * 60},
        default=str,
    )  # fmt: skip
    print(table)
    print(f"wrote {args.out}.md and {args.out}.json ({total_min:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
