"""``mita train --full-first S``: full causal attention for the first S optimizer steps, then the run's kind.

The causal mixers of :class:`mita.models.GPT` hold no weights, so swapping one for another changes what
attention computes and nothing else: weights, optimizer state and the learning-rate schedule carry on
across the switch. Until step S the run is therefore the full-attention run of the same seed (same initial
weights, same batches), step for step; evaluations before the switch see full attention too. The model
is saved with its own kind, the one it trains as after step S.
"""

from __future__ import annotations

from torch import nn

from ..nn.causal import FullCausal

__all__ = ["FullFirst", "full_first"]


class FullFirst:
    """Puts full causal attention into every mixer slot of ``model`` while fewer than ``steps`` optimizer
    steps are done, and the model's own mixers after."""

    def __init__(self, model: nn.Module, steps: int) -> None:
        # a GPT's attention layers: the modules holding a causal ``mixer``
        self.attns = [m for m in model.modules() if isinstance(getattr(m, "mixer", None), nn.Module)]
        self.own = [a.mixer for a in self.attns]
        self.full = [FullCausal() for _ in self.attns]
        self.steps = steps

    def at(self, done: int) -> None:
        """The mixers of the optimizer step that follows ``done`` finished steps (a resumed run: its step)."""
        for attn, own, full in zip(self.attns, self.own, self.full):
            attn.mixer = full if done < self.steps else own


def full_first(model: nn.Module, steps: int | None, total_steps: int) -> FullFirst | None:
    """The switch of ``--full-first steps`` for a run of ``total_steps`` (None without the flag);
    ValueError when the model has no causal mixers or the switch leaves no step to the run's own kind."""
    if not steps:
        return None
    switch = FullFirst(model, steps)
    if not switch.attns:
        raise ValueError(
            "--full-first: only for the causal kinds of the GPT presets (tasks mqar, shakespeare-char)"
        )
    if not 0 < steps < total_steps:
        raise ValueError(f"--full-first {steps} must be between 1 and the run's {total_steps} steps - 1")
    return switch
