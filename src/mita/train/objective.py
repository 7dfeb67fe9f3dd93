"""The loss and the accuracy count, for classifiers and language models alike.

A classifier returns logits ``[B, C]`` for labels ``[B]``; a language model returns ``[B, T, V]`` for
targets ``[B, T]`` where ``IGNORE_INDEX`` (-100) marks positions without a loss (MQAR: all but the
answers). A segmenter returns ``[B, C, H, W]`` for labels ``[B, H, W]`` (a class per pixel). Accuracy is
counted over positions that carry a target; for a classifier that is every sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def loss_fn(logits: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy per target, in float32 whatever the autocast dtype of ``logits``."""
    if logits.ndim == 4:  # (B, C, H, W) per-pixel logits
        return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    if logits.ndim == 3:  # (B, T, V) -> (B*T, V)
        flat = logits.flatten(0, 1).float()
        return F.cross_entropy(flat, y.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets (no smoothing): the evaluation loss, as a float64 0-d tensor."""
    if logits.ndim == 4:  # (B, C, H, W): the class dimension is 1
        return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum").double()
    flat, target = (logits.flatten(0, 1), y.flatten()) if logits.ndim == 3 else (logits, y)
    return F.cross_entropy(flat.float(), target, ignore_index=IGNORE_INDEX, reduction="sum").double()


def hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct, targets)`` as 0-d tensors on the logits' device (no host sync): argmax == y over
    the positions that carry a target."""
    has_target = y != IGNORE_INDEX
    pred = logits.argmax(1 if logits.ndim == 4 else -1)  # segmenters: classes on dimension 1
    return ((pred == y) & has_target).sum(), has_target.sum()


def sparse_targets(y: torch.Tensor) -> bool:
    """Whether ``y`` are token targets ``[B, T]`` with positions that carry no loss (one host sync)."""
    return y.ndim == 2 and bool((y == IGNORE_INDEX).any())


def bits_per_byte(loss: float | None, bytes_per_token: float | None) -> float | None:
    """Mean loss (nats per token) as bits per byte of text; None when either is unknown."""
    if loss is None or bytes_per_token is None or not math.isfinite(loss):
        return None
    return loss / math.log(2) / bytes_per_token
