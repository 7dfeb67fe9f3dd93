"""``mita eval``: accuracy and throughput of a checkpoint, optionally with another attention or m and k.

``mita eval --checkpoint PATH [--attention KIND] [--num-landmarks M] [--topk K] [--json PATH]`` rebuilds
the checkpoint's model, optionally swaps its attention (``mita.convert``, keeping the weights: SPEC §3
"checkpoint swap") or changes MiTA's m and k at inference (the m x k robustness grid), and prints
test accuracy and samples per second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from mita.io import write_json
from mita.nn.registry import ATTENTION_CLASSES
from mita.system import positive_int
from mita.train.checkpoint import CheckpointError
from mita.train.objective import bits_per_byte

from .loading import (
    add_eval_args,
    check_eval_args,
    check_writable,
    eval_dataset,
    evaluate_variant,
    load_checkpoint,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mita eval", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "--checkpoint", required=True, help="model.safetensors, a checkpoint file, or a run directory"
    )
    p.add_argument(
        "--attention", choices=list(ATTENTION_CLASSES), help="evaluate with this kind, not the trained one"
    )
    p.add_argument("--num-landmarks", type=positive_int, help="m at inference (MiTA / Agent)")
    p.add_argument("--topk", type=positive_int, help="k at inference (MiTA / top-k)")
    p.add_argument("--split", default="test")
    p.add_argument("--amp", action="store_true", help="autocast to bfloat16/float16")
    p.add_argument("--json", help="also write the result as JSON to this path")
    add_eval_args(p, batch_size=256)
    return p


def _summary_line(task: str, split: str, result: dict[str, Any]) -> str:
    """``listops test: accuracy 37.50%, loss 1.92 on 16 samples, 812.3 samples/s`` (what was measured)."""
    parts = []
    if result.get("test_miou") is not None:  # segmentation: mIoU first; accuracy is pixel accuracy
        base = result.get("baseline_miou")
        parts.append(f"mIoU {100 * result['test_miou']:.2f}% (all-background {100 * (base or 0):.2f}%)")
    if result.get("test_accuracy") is not None:
        what = "pixel accuracy" if result.get("test_miou") is not None else "accuracy"
        parts.append(f"{what} {100 * result['test_accuracy']:.2f}%")
    if result.get("test_loss") is not None:
        parts.append(f"loss {result['test_loss']:.4f}")
    if result.get("test_bits_per_byte") is not None:
        parts.append(f"{result['test_bits_per_byte']:.4f} bits/byte")
    speed = f"{result['samples_per_s']:.1f} samples/s"
    return f"{task} {split}: {', '.join(parts)} on {result['n']} samples, {speed}"


def main(argv: Sequence[str] | None = None) -> int:
    """``mita eval``: print (and optionally write) accuracy and throughput of a checkpoint."""
    args = _parser().parse_args(argv)
    try:
        device = check_eval_args(args, "mita eval", figures=False)
        model, meta = load_checkpoint(args.checkpoint)
        if args.json:
            check_writable(args.json)  # before the evaluation, not after it
        dataset = eval_dataset(
            meta, split=args.split, root=args.data_root, cache_dir=args.cache_dir, size=args.test_size
        )
        result, used = evaluate_variant(
            model, meta.get("attention"), dataset, args.attention, batch_size=args.batch_size, device=device,
            max_samples=args.test_size, amp=args.amp, num_landmarks=args.num_landmarks, topk=args.topk,
        )  # fmt: skip
        bpt = getattr(getattr(dataset, "info", None), "bytes_per_token", None)  # byte-level LM tasks
        if result.get("test_bits_per_byte") is None and bpt is not None:
            result["test_bits_per_byte"] = bits_per_byte(result.get("test_loss"), bpt)
        report = {
            "checkpoint": str(args.checkpoint),
            "task": meta["task"],
            "split": args.split,
            "trained_attention": meta.get("attention"),
            **used,
            **result,
        }
        print(
            f"{_summary_line(meta['task'], args.split, result)} (trained with {meta.get('attention')}, "
            f"evaluated with {', '.join(f'{k}={v}' for k, v in used.items())})"
        )
        if args.json:
            write_json(args.json, report)
    except (CheckpointError, ValueError, ImportError, OSError) as err:
        print(f"mita eval: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: nothing half-written (--json is written last, atomically)
        print("mita eval: interrupted", file=sys.stderr)
        return 130
    return 0
