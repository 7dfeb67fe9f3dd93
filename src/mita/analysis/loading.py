"""What the analysis commands share: load a checkpoint with its evaluation data, evaluate a variant."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

__all__ = ["load_checkpoint", "eval_dataset", "parse_int_list", "write_json"]


def add_eval_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The evaluation options every analysis command shares (batch size, device, data locations)."""
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", help="data directory (default: the data module's default)")
    parser.add_argument("--cache-dir", help="cache of generated tasks (default: the data module's default)")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)`` of a ``mita train`` checkpoint (:func:`mita.train.checkpoint.load_model`)."""
    from mita.train.checkpoint import load_model

    return load_model(path)


def eval_dataset(
    meta: dict[str, Any],
    *,
    split: str = "test",
    root: str | None = None,
    cache_dir: str | None = None,
    size: int | None = None,
) -> Dataset:
    """The evaluation split of a checkpoint's task, built with the data options it was trained with.

    ``size`` keeps the first ``size`` examples (generated tasks then generate only those).
    """
    from mita.data import build_dataset

    kwargs = dict(meta.get("data_kwargs", {}))
    kwargs.pop("size", None)  # the training-set cut does not apply to the evaluation split
    kwargs.pop("augment", None)  # evaluation never augments
    if root is not None:
        kwargs["root"] = root
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    if size is not None:
        kwargs["size"] = size
    return build_dataset(meta["task"], split, augment=False, **kwargs)


def parse_int_list(text: str, name: str) -> list[int]:
    """``"1,4,9"`` -> ``[1, 4, 9]``; ValueError naming the option on anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} needs positive integers, got {text!r}")
    return values


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN written as null, so every JSON reader accepts it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(data), indent=2) + "\n")
    return path


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x
