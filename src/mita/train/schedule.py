"""Learning-rate schedule: linear warm-up then cosine decay, as a picklable LambdaLR factor."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Rises linearly from ``1 / (warmup + 1)`` to 1 over ``warmup`` steps, then follows a half cosine
    down to ``min_ratio`` at ``total`` steps (and stays there). A plain object with only numbers as
    attributes, so :class:`torch.optim.lr_scheduler.LambdaLR` can save and restore it.
    """

    def __init__(self, total: int, warmup: int, min_ratio: float = 0.0) -> None:
        if total < 1:
            raise ValueError(f"total steps must be >= 1, got {total}")
        if not 0 <= warmup <= total:
            raise ValueError(f"warm-up steps must be in [0, total={total}], got {warmup}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step with :class:`WarmupCosine`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup, min_ratio))
