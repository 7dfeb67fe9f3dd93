"""Moving batches to a device and calling a model on them, for every task kind (image, sequence, pair, lm)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or a tuple/list of tensors for pair tasks) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device) for t in x)
    raise TypeError(f"cannot move a batch of type {type(x).__name__} to a device")


def forward(model: nn.Module, x: Any) -> torch.Tensor:
    """Logits ``[B, C]`` (classifiers) or ``[B, T, V]`` (language models); pair tasks pass their
    ``(tokens_a, tokens_b)`` tuple as the one argument."""
    return model(tuple(x) if isinstance(x, list) else x)


def batch_size_of(x: Any) -> int:
    """Number of samples in a batch."""
    return len(x[0]) if isinstance(x, (tuple, list)) else len(x)
