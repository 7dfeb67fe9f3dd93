"""Segmentation scores from a confusion matrix: per-class IoU, mIoU, pixel accuracy, all-background baseline.

The confusion matrix ``conf[t, p]`` counts pixels of true class ``t`` predicted as ``p`` (accumulated over
the whole test set, not averaged per image). ``IoU_c = conf[c, c] / (row_c + col_c - conf[c, c])``. mIoU is
the mean of ``IoU_c`` over the classes that occur in the ground truth or the prediction; a class absent
from both has an undefined IoU (0 / 0) and is left out of the mean (as ``nanmean`` in common
segmentation toolkits). Background is a class like the others and counts in the mean.
"""

from __future__ import annotations

import torch

__all__ = ["confusion_matrix", "segmentation_scores", "background_baseline"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts of (true, predicted) pairs over pixels of any shape (no host sync);
    targets outside ``0 .. C-1`` (e.g. an ignore index) are left out."""
    t, p = target.reshape(-1), pred.reshape(-1)
    keep = (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + p[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor) -> dict[str, float | list[float | None]]:
    """``{"miou", "pixel_accuracy", "iou"}`` of a confusion matrix (``iou``: per class, None where the
    class is absent from both ground truth and prediction)."""
    conf = conf.double().cpu()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    total = conf.sum()
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())],
    }


def background_baseline(conf: torch.Tensor, background: int = 0) -> dict[str, float | list[float | None]]:
    """The scores of predicting ``background`` everywhere on the same pixels as ``conf``."""
    gt = conf.sum(1)
    base = torch.zeros_like(conf)
    base[:, background] = gt
    return segmentation_scores(base)
