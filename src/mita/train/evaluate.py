"""Accuracy and throughput of a model on a task's split (the ``mita eval`` command is
:mod:`mita.analysis.eval_cli`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mita.data import build_dataset
from mita.data.paths import resolve_data_kwargs
from mita.system import resolve_device

from .batches import batch_size_of, forward, to_device
from .objective import hits, loss_sum
from .segmentation import background_baseline, confusion_matrix, segmentation_scores


@dataclass
class EvalSums:
    """Totals of one pass over a data set: sums over targets (positions with a label) and samples."""

    correct: torch.Tensor  # 0-d, on the evaluation device: argmax == target
    targets: torch.Tensor  # 0-d: positions with a target (= samples for a classifier)
    loss: torch.Tensor  # 0-d float64: summed cross-entropy over targets
    samples: int
    seconds: float  # wall time of data loading and forward passes
    confusion: torch.Tensor | None = None  # segmenters: [C, C] (true, predicted) pixel counts

    def totals(self) -> torch.Tensor:
        """``[correct, targets, loss, samples]`` in float64, one tensor to all-reduce over ranks."""
        n = torch.tensor(float(self.samples), dtype=torch.float64, device=self.loss.device)
        return torch.stack([self.correct.double(), self.targets.double(), self.loss, n])


@torch.no_grad()
def eval_sums(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    amp: bool = False,
    num_workers: int = 0,
) -> EvalSums:
    """Correct predictions, targets and summed loss of ``model`` over ``dataset`` (classifier logits
    ``[B, C]`` or language-model logits ``[B, T, V]``, see :mod:`mita.train.objective`); one host sync
    at the end, none per batch."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    correct = torch.zeros((), dtype=torch.long, device=device)
    targets = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    confusion = None
    amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    start = time.perf_counter()
    for x, y in loader:
        x, y = to_device(x, device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = forward(model, x)
        c, t = hits(logits, y)
        correct += c
        targets += t
        loss += loss_sum(logits, y)
        if logits.ndim == 4:  # per-pixel classes: the confusion matrix gives mIoU
            conf = confusion_matrix(logits.argmax(1), y, logits.shape[1])
            confusion = conf if confusion is None else confusion + conf
        n += batch_size_of(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return EvalSums(correct, targets, loss, n, seconds, confusion)


def evaluate(
    model: nn.Module,
    task_or_dataset: str | Dataset,
    *,
    split: str = "test",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    max_samples: int | None = None,
    amp: bool = False,
    data_kwargs: dict[str, Any] | None = None,
) -> dict[str, float | int]:
    """Accuracy of ``model`` on a task's split (built with :func:`mita.data.build_dataset`) or a dataset.

    Args:
        model: a classifier taking a batch ``x`` (or ``*x`` for pair tasks) and returning ``[B, C]`` logits.
        task_or_dataset: a task name (``mita.data.TASKS``) or a dataset of ``(x, label)``.
        split: which split to build when a task name is given.
        batch_size: evaluation batch size.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...; the model is moved there.
        max_samples: evaluate the first ``max_samples`` samples only.
        amp: autocast (bfloat16, or float16 on GPUs without bf16).
        data_kwargs: extra keyword arguments for ``build_dataset`` (``root``, ``cache_dir``, ``seq_len``...);
            default: those the model was trained with when it came from
            :func:`mita.train.checkpoint.load_model` for the same task, else none.

    Returns:
        ``{"test_accuracy": float in [0, 1], "test_loss": float, "samples_per_s": float, "n": int,
        "targets": int, "seconds": float}``: accuracy and mean cross-entropy over targets (for a
        language model, tokens with a target; for MQAR, recall of the answers), ``n`` samples.
        Segmenters (logits ``[B, C, H, W]``) add ``test_miou``, ``test_pixel_accuracy``, ``test_iou``
        (per class) and the all-background baseline's ``baseline_miou`` / ``baseline_pixel_accuracy``
        (:mod:`mita.train.segmentation`).
    """
    if isinstance(task_or_dataset, str):
        if data_kwargs is None:
            meta = getattr(model, "mita_meta", None) or {}
            recorded = meta.get("data_kwargs") if meta.get("task") == task_or_dataset else None
            # found here, not where it was trained; never the training machine's cache directory
            data_kwargs = resolve_data_kwargs(task_or_dataset, recorded)
        dataset = build_dataset(task_or_dataset, split, augment=False, **data_kwargs)
    else:
        dataset = task_or_dataset
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        dataset = Subset(dataset, range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    dev = resolve_device(device)
    model = model.to(dev)
    sums = eval_sums(model, dataset, batch_size=batch_size, device=dev, amp=amp)
    targets = int(sums.targets)
    if targets == 0:
        raise ValueError("the dataset has no targets to evaluate (every label is the ignore index -100)")
    result = {
        "test_accuracy": int(sums.correct) / targets,
        "test_loss": float(sums.loss) / targets,
        "samples_per_s": sums.samples / sums.seconds if sums.seconds > 0 else float("inf"),
        "n": sums.samples,
        "targets": targets,
        "seconds": sums.seconds,
    }
    if sums.confusion is not None:
        result.update(segmentation_report(sums.confusion))
    return result


def segmentation_report(confusion: torch.Tensor) -> dict[str, Any]:
    """``test_miou``, ``test_pixel_accuracy``, ``test_iou`` and the all-background baseline's scores."""
    scores, base = segmentation_scores(confusion), background_baseline(confusion)
    return {
        "test_miou": scores["miou"],
        "test_pixel_accuracy": scores["pixel_accuracy"],
        "test_iou": scores["iou"],
        "baseline_miou": base["miou"],
        "baseline_pixel_accuracy": base["pixel_accuracy"],
    }
