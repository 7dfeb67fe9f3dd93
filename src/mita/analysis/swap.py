"""``mita swap``: the train-attention x eval-attention accuracy matrix ("checkpoint swap", SPEC §3).

``mita swap --checkpoints A B C --out DIR [--kinds full,agent,mita] [--test-size N]`` evaluates each
checkpoint's weights with each attention kind (``mita.convert``; the checkpoint's own kind runs as
trained) and writes ``DIR/swap.json`` and the heatmap ``DIR/swap.png`` (rows: attention at evaluation,
columns: checkpoints labelled by the attention they were trained with, as the paper's Fig. 8).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from ..io import write_json
from ..nn.registry import attention_class
from ..system import positive_int
from . import plots
from .loading import (
    add_eval_args,
    check_eval_args,
    check_writable,
    eval_dataset,
    evaluate_variant,
    load_checkpoint,
)  # fmt: skip

__all__ = ["swap_column", "main"]

KINDS = ("full", "agent", "mita")


def swap_column(
    model: nn.Module,
    trained: str,
    dataset: Dataset,
    kinds: Sequence[str],
    *,
    convert_kwargs: dict[str, Any] | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> tuple[list[float], dict[str, str], int]:
    """Accuracy of one trained ``model`` evaluated with each of ``kinds`` (NaN where it cannot convert).

    ``convert_kwargs`` (e.g. ``num_landmarks``, ``topk``) are passed to :func:`mita.convert` for kinds
    other than the trained one, each kind getting those it takes (full attention takes neither).
    Returns ``(accuracies, errors by kind, samples evaluated)``.
    """
    accs, errors, n = [], {}, 0
    for kind in kinds:
        settings = {} if kind == trained else convert_kwargs or {}  # the trained kind runs as trained
        try:
            result, _ = evaluate_variant(
                model, trained, dataset, kind, batch_size=batch_size, device=device, max_samples=max_samples,
                **settings,
            )  # fmt: skip
        except ValueError as err:
            accs.append(float("nan"))
            errors[kind] = str(err)
            continue
        accs.append(result["test_accuracy"])
        n = result["n"]
    return accs, errors, n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mita swap", description="Train-attention x eval-attention accuracy matrix"
    )
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints (files or run directories)")
    p.add_argument("--out", required=True, help="directory for swap.json and swap.png")
    p.add_argument("--kinds", default=",".join(KINDS), help="attention kinds to evaluate with (rows)")
    p.add_argument(
        "--num-landmarks", type=positive_int, help="m for converted MiTA/Agent (default: mita.convert's)"
    )
    p.add_argument("--topk", type=positive_int, help="k for converted MiTA (default: mita.convert's)")
    add_eval_args(p, batch_size=256)
    return p


def _label(path: str, attention: str, labels: list[str]) -> str:
    label = attention
    if label in labels:  # two checkpoints trained with the same attention: tell them apart by name
        label = f"{attention} ({Path(path).name})"
    return label


def main(argv: Sequence[str] | None = None) -> int:
    """``mita swap``: see the module docstring."""
    args = _parser().parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    kwargs = {k: v for k, v in (("num_landmarks", args.num_landmarks), ("topk", args.topk)) if v is not None}
    columns: list[dict[str, Any]] = []
    task = None
    try:
        if not kinds:
            raise ValueError(f"--kinds needs at least one attention kind, got {args.kinds!r}")
        for kind in kinds:
            attention_class(kind)  # an unknown kind fails here, naming the valid ones
        device = check_eval_args(args, "mita swap", figures=True)
        out = check_writable(args.out, directory=True)
        for path in args.checkpoints:
            model, meta = load_checkpoint(path, purpose="mita swap")
            if task is not None and meta.get("task") != task:
                raise ValueError(f"{path} was trained on {meta.get('task')!r}, the others on {task!r}")
            task = meta.get("task")
            dataset = eval_dataset(meta, root=args.data_root, cache_dir=args.cache_dir, size=args.test_size)
            accs, errors, n = swap_column(
                model,
                meta.get("attention"),
                dataset,
                kinds,
                convert_kwargs=kwargs,
                max_samples=args.test_size,
                batch_size=args.batch_size,
                device=device,
            )
            label = _label(path, str(meta.get("attention")), [c["label"] for c in columns])
            columns.append(
                {
                    "checkpoint": str(path),
                    "trained_attention": meta.get("attention"),
                    "label": label,
                    "accuracy": accs,
                    "errors": errors,
                    "n": n,
                }
            )
    except (ValueError, ImportError, OSError) as err:
        print(f"mita swap: error: {err}", file=sys.stderr)
        return 2
    matrix = np.asarray([c["accuracy"] for c in columns], dtype=float).T  # rows: eval kind, cols: ckpt
    write_json(
        out / "swap.json",
        {
            "task": task,
            "eval_attention": kinds,
            "convert_kwargs": kwargs,
            "columns": columns,
            "accuracy": matrix.tolist(),
        },
    )
    plots.plot_heatmap(
        out / "swap.png",
        100 * matrix,
        row_labels=kinds,
        col_labels=[c["label"] for c in columns],
        xlabel="weights trained with",
        ylabel="evaluated with",
        title=f"{task} test accuracy (%) after swapping the attention",
    )
    width = max(len(c["label"]) for c in columns) + 2
    print(" " * 8 + "".join(f"{c['label']:>{width}}" for c in columns))
    for kind, row in zip(kinds, matrix):
        print(f"{kind:>8}" + "".join(f"{'-' if v != v else f'{100 * v:.1f}':>{width}}" for v in row))
    print(f"wrote swap.json and swap.png to {out}")
    return 0
