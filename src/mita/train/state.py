"""The counters and figures of one run, saved in every checkpoint under their own names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RunState:
    """Where a run is and what it has measured so far.

    The checkpoint's training state holds these fields under these names (beside the optimizer,
    scheduler, grad scaler and RNG states), and ``summary.json`` reports the figures under the same
    names, so a resumed run, and a finished one, knows everything the run that wrote it knew.
    """

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    samples_seen: int = 0  # over all ranks
    train_time_s: float = 0.0  # forward, backward and optimizer steps only
    wall_time_s: float = 0.0  # everything, over every process the run had
    test_accuracy: float | None = None  # of the last evaluation
    best_test_accuracy: float = 0.0
    test_loss: float | None = None  # mean per target of the last evaluation
    eval_samples_per_s: float | None = None
    last_eval_step: int = -1
    peak_memory_bytes: int = 0  # the largest over the processes the run had

    def advance(self, samples: int, steps_per_epoch: int, epoch_step: bool = True) -> None:
        """Count one optimizer step over ``samples`` samples (all ranks); ``epoch_step=False`` for a
        curriculum stage's step, which is no part of the task's epochs."""
        self.step += 1
        self.samples_seen += samples
        if not epoch_step:
            return
        self.batch_in_epoch += 1
        if self.batch_in_epoch == steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def record_eval(self, accuracy: float, loss: float, samples_per_s: float) -> None:
        """Note an evaluation at the current step."""
        self.test_accuracy, self.test_loss, self.eval_samples_per_s = accuracy, loss, samples_per_s
        self.best_test_accuracy = max(self.best_test_accuracy, accuracy)
        self.last_eval_step = self.step

    def note_peak_memory(self, peak_bytes: int) -> None:
        self.peak_memory_bytes = max(self.peak_memory_bytes, peak_bytes)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> RunState:
        """The fields of a checkpoint's training state (which also holds the optimizer's and others')."""
        missing = [f.name for f in fields(cls) if f.name not in saved]
        if missing:
            raise KeyError(f"training state lacks {', '.join(missing)}")
        return cls(**{f.name: saved[f.name] for f in fields(cls)})
