"""``mita grid``: test accuracy of a MiTA checkpoint over inference-time m (landmarks) x k (top-k).

``mita grid --checkpoint PATH --num-landmarks 1,4,9,16 --topk 1,4,9,16 --out DIR [--test-size N]``
evaluates the trained weights with every (m, k) (a copy converted with ``mita.convert(model, "mita",
num_landmarks=m, topk=k)``; SPEC §3 "inference-time m x k robustness") and writes ``DIR/grid.json``
and the heatmap ``DIR/grid.png`` (rows m, columns k, accuracy in %, the training point outlined).
Combinations the model cannot run (e.g. more landmarks than patches) are reported as null with the reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from ..io import write_json
from ..system import parse_int_list
from . import plots
from .loading import (
    add_eval_args,
    check_eval_args,
    check_writable,
    eval_dataset,
    evaluate_variant,
    load_checkpoint,
)

__all__ = ["accuracy_grid", "main"]


def _trained_mk(meta: dict[str, Any]) -> tuple[int | None, int | None]:
    kw = meta.get("model_kwargs", {}) or {}
    return kw.get("num_landmarks"), kw.get("topk")


def accuracy_grid(
    model: nn.Module,
    dataset: Dataset,
    ms: Sequence[int],
    ks: Sequence[int],
    *,
    max_samples: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Accuracy of ``model`` converted to MiTA with each ``(m, k)``; the model itself is left unchanged.

    Returns ``{"m": ms, "k": ks, "accuracy": [[acc or None]] (rows m, columns k, in [0, 1]),
    "errors": {"m=..,k=..": reason}, "n": samples evaluated}``.
    """
    acc = np.full((len(ms), len(ks)), np.nan)
    errors: dict[str, str] = {}
    n = 0
    for i, m in enumerate(ms):
        for j, k in enumerate(ks):
            try:
                result, _ = evaluate_variant(
                    model, None, dataset, "mita", batch_size=batch_size, device=device,
                    max_samples=max_samples, num_landmarks=m, topk=k,
                )  # fmt: skip
            except ValueError as err:  # m or k that does not fit this model's tokens
                errors[f"m={m},k={k}"] = str(err)
                continue
            acc[i, j] = result["test_accuracy"]
            n = result["n"]
    if np.isnan(acc).all():
        raise ValueError(f"no (m, k) combination could be evaluated: {next(iter(errors.values()))}")
    return {"m": list(ms), "k": list(ks), "accuracy": acc.tolist(), "errors": errors, "n": n}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mita grid", description="Accuracy over inference-time m x k")
    p.add_argument("--checkpoint", required=True, help="model.safetensors, checkpoint file or run directory")
    p.add_argument(
        "--num-landmarks", default="1,4,9,16,25,36,49", help="comma-separated m values (numbers of landmarks)"
    )
    p.add_argument(
        "--topk", default="1,4,9,16,25,36,49", help="comma-separated k values (keys per routed expert)"
    )
    p.add_argument("--out", required=True, help="directory for grid.json and grid.png")
    add_eval_args(p, batch_size=256)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mita grid``: see the module docstring."""
    args = _parser().parse_args(argv)
    try:
        ms = parse_int_list(args.num_landmarks, "--num-landmarks")
        ks = parse_int_list(args.topk, "--topk")
        device = check_eval_args(args, "mita grid", figures=True)
        model, meta = load_checkpoint(args.checkpoint, purpose="mita grid")
        out = check_writable(args.out, directory=True)
        dataset = eval_dataset(meta, root=args.data_root, cache_dir=args.cache_dir, size=args.test_size)
        result = accuracy_grid(
            model, dataset, ms, ks, max_samples=args.test_size, batch_size=args.batch_size, device=device
        )
    except (ValueError, ImportError, OSError) as err:
        print(f"mita grid: error: {err}", file=sys.stderr)
        return 2
    tm, tk = _trained_mk(meta)
    report = {
        "checkpoint": str(args.checkpoint),
        "task": meta.get("task"),
        "trained_attention": meta.get("attention"),
        "trained_m": tm,
        "trained_k": tk,
        **result,
    }
    write_json(out / "grid.json", report)
    mark = (ms.index(tm), ks.index(tk)) if tm in ms and tk in ks else None
    plots.plot_heatmap(
        out / "grid.png",
        100 * np.asarray(result["accuracy"], dtype=float),
        row_labels=[str(m) for m in ms],
        col_labels=[str(k) for k in ks],
        xlabel="k (keys per routed expert) at inference",
        ylabel="m (landmarks) at inference",
        title=f"{meta.get('task')} test accuracy (%), trained with m={tm}, k={tk} (outlined)",
        mark=mark,
    )
    for m, row in zip(ms, result["accuracy"]):
        cells = " ".join("  -  " if a is None or a != a else f"{100 * a:5.1f}" for a in row)
        print(f"m={m:>4}: {cells}")
    print(f"wrote grid.json and grid.png to {out} ({result['n']} samples per cell)")
    return 0
