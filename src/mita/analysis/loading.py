"""What the evaluation commands (``mita eval``, ``grid``, ``swap``, ``viz``) share: their common options,
loading a checkpoint with its evaluation data, and evaluating a converted copy of a model."""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..convert import convert
from ..data import build_dataset
from ..data.paths import resolve_data_kwargs
from ..deps import require
from ..models.gpt import GPT
from ..nn.registry import filter_kwargs
from ..system import positive_int, resolve_device
from ..train.checkpoint import load_model
from ..train.evaluate import evaluate

__all__ = [
    "add_eval_args",
    "check_eval_args",
    "check_writable",
    "load_checkpoint",
    "eval_dataset",
    "variant",
    "evaluate_variant",
]


def add_eval_args(parser: argparse.ArgumentParser, batch_size: int, *, test_size: bool = True) -> None:
    """The evaluation options every evaluation command shares, spelled as ``mita train`` spells them:
    ``--batch-size``, ``--device`` (default ``auto``), ``--data-root``, ``--cache-dir``, ``--test-size``."""
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    parser.add_argument("--data-root", help=_DATA_ROOT_HELP)
    parser.add_argument("--cache-dir", help="cache of generated tasks (default $MITA_CACHE or ~/.cache/mita)")
    if test_size:
        parser.add_argument("--test-size", type=positive_int, help=_TEST_HELP)


_DATA_ROOT_HELP = (
    "data directory (default: $MITA_FMNIST_DIR / $MITA_TEXT_DIR, else the one given at training if it "
    "exists here, else the data module's default)"
)
_TEST_HELP = "evaluate on the first N test samples only"


def check_eval_args(args: argparse.Namespace, prog: str, *, figures: bool) -> str:
    """Validate what the parser cannot before any work starts; returns the resolved device name.

    Raises ValueError (bad ``--device``) or :class:`mita.deps.MissingDependency` (``figures`` without
    matplotlib).
    """
    device = str(resolve_device(args.device))
    if figures:
        require("matplotlib", purpose=f"{prog} (its figures)")
    return device


def check_writable(path: str | Path, *, directory: bool = False) -> Path:
    """Make sure ``path`` (a file, or with ``directory=True`` a directory for outputs) can be written,
    creating the directories it needs; ValueError saying why not. Called before long work starts."""
    path = Path(path)
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise ValueError(f"{path} is a directory, not a file to write")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to {folder} ({err.strerror or err})") from None
    return path


def load_checkpoint(path: str | Path, *, purpose: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)`` of a ``mita train`` checkpoint (:func:`mita.train.checkpoint.load_model`);
    ValueError when the metadata does not name its task, or (with ``purpose``, the command's name) when
    it holds a GPT, which that command cannot analyse."""
    model, meta = load_model(path)
    if not meta.get("task"):
        raise ValueError(f"{path}: the checkpoint's metadata does not name its task (no 'task' key)")
    if purpose is not None:
        check_not_language_model(model, purpose)
    return model, meta


def check_not_language_model(model: nn.Module, what: str) -> None:
    """ValueError when ``model`` is a GPT: the attention swaps, landmark and routing analyses work on the
    non-causal attention modules of classifiers, not on causal language models."""
    if isinstance(model, GPT):
        raise ValueError(
            f"{what} is not supported for GPT checkpoints (causal language models); evaluate them with "
            "their trained attention (mita eval without --attention / --num-landmarks / --topk)"
        )


def eval_dataset(
    meta: dict[str, Any],
    *,
    split: str = "test",
    root: str | None = None,
    cache_dir: str | None = None,
    size: int | None = None,
) -> Dataset:
    """The evaluation split of a checkpoint's task, built with the data options it was trained with.

    Data directories are looked up here, not where the checkpoint was trained
    (:func:`mita.data.paths.resolve_data_kwargs`); ``size`` keeps the first ``size`` examples
    (generated tasks then generate only those).
    """
    kwargs = resolve_data_kwargs(meta["task"], meta.get("data_kwargs"), root=root, cache_dir=cache_dir)
    if size is not None:
        kwargs["size"] = size
    return build_dataset(meta["task"], split, augment=False, **kwargs)


def variant(
    model: nn.Module,
    trained: str | None,
    attention: str | None = None,
    **settings: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` to evaluate with ``attention`` (default: the ``trained`` kind) and new ``settings``
    (``num_landmarks``, ``topk``; None = keep): a converted copy (:func:`mita.convert`), or ``model``
    itself when nothing changes. Settings a kind does not take are dropped (full attention takes neither).

    Returns the model and the attention settings actually used (for reports).
    """
    kind = attention or trained
    if kind != trained or any(v is not None for v in settings.values()):
        check_not_language_model(model, "--attention / --num-landmarks / --topk")
    if kind is None:
        raise ValueError("the checkpoint does not say which attention it was trained with; pass --attention")
    given = {k: v for k, v in settings.items() if v is not None}
    if kind == trained and not given:  # nothing to change (and nothing to look up in the registry)
        return model, {"attention": kind}
    kwargs = filter_kwargs(kind, given)
    if kind == trained and not kwargs:
        return model, {"attention": kind}
    return convert(copy.deepcopy(model), kind, **kwargs), {"attention": kind, **kwargs}


def evaluate_variant(
    model: nn.Module,
    trained: str | None,
    dataset: Dataset,
    attention: str | None = None,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    max_samples: int | None = None,
    amp: bool = False,
    **settings: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`variant`, then :func:`mita.train.evaluate.evaluate` on ``dataset``: ``(result, used)``.

    ValueError when the conversion or the model cannot run on these inputs (e.g. m > N).
    """
    converted, used = variant(model, trained, attention, **settings)
    result = evaluate(
        converted, dataset, batch_size=batch_size, device=device, max_samples=max_samples, amp=amp
    )
    return result, used
