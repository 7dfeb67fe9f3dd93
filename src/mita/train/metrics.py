"""What a run reports while it trains: the loss/accuracy window, when to log, evaluate and save,
``metrics.jsonl``, the progress bar, and the clocks.

The window sums on the device (no host sync per step); one all-reduce per logged step brings every
rank's sums together. ``metrics.jsonl`` holds one strict-JSON record per line (NaN as ``null``), written
by rank 0; on resume, records after the checkpoint's step are dropped, since they will be redone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mita.io import to_json, write_text

from . import distributed as dist_
from .errors import Diverged
from .report import PROGRESS_LINE_ENV
from .state import RunState


class Metrics:
    """Train-metric window, interval decisions, ``metrics.jsonl`` and the progress bar of one run.

    ``log_every`` / ``eval_every`` / ``save_every`` are in steps (``None``: once per epoch); every epoch
    end and the last step are always logged, evaluated and saved.
    """

    def __init__(
        self,
        out: Path,
        *,
        dist: dist_.DistInfo,
        device: torch.device,
        steps_per_epoch: int,
        total_steps: int,
        log_every: int,
        eval_every: int | None,
        save_every: int | None,
    ) -> None:
        self.path, self.dist, self.device = out / "metrics.jsonl", dist, device
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.log_every = log_every
        self.eval_every = eval_every or steps_per_epoch
        self.save_every = save_every or steps_per_epoch
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * targets, correct, targets
        self._samples = 0
        self._checked = True  # the window holds no step whose loss was not checked to be finite
        self.bar: Any = None

    # ---- intervals ---------------------------------------------------------------------------------

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step % self.steps_per_epoch == 0 or step >= self.total_steps

    def should_log(self, step: int) -> bool:
        return self._due(step, self.log_every)

    def should_eval(self, step: int) -> bool:
        return self._due(step, self.eval_every)

    def should_save(self, step: int) -> bool:
        return self._due(step, self.save_every)

    # ---- the window --------------------------------------------------------------------------------

    def add(self, loss: torch.Tensor, correct: torch.Tensor, targets: torch.Tensor, samples: int) -> None:
        """One step's mean loss per target, correct predictions and targets (0-d tensors), and samples."""
        t = targets.double()
        self._sums += torch.stack([loss.double() * t, correct.double(), t])
        self._samples += samples
        self._checked = False
        if self.bar is not None:
            self.bar.update(1)

    def _reduce(self) -> tuple[float, float, int]:
        """``(mean loss, accuracy, samples)`` of the window over all ranks; empties the window."""
        n = torch.tensor([float(self._samples)], dtype=torch.float64, device=self.device)
        sums = dist_.all_reduce_sum(torch.cat([self._sums, n]), self.dist).tolist()
        self._sums.zero_()
        self._samples, self._checked = 0, True
        return sums[0] / sums[2], sums[1] / sums[2], int(sums[3])

    def ensure_finite(self, step: int) -> None:
        """Raise :class:`Diverged` when a step since the last check had a non-finite loss (a collective:
        every rank calls it at the same step). Called before anything is evaluated or saved."""
        if self._checked:
            return
        total = dist_.all_reduce_sum(self._sums[:1], self.dist)
        self._checked = True
        if not bool(torch.isfinite(total).all()):
            raise Diverged(f"the training loss is not finite at step {step}")

    # ---- records -----------------------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> None:
        """Append one strict-JSON record to ``metrics.jsonl`` (rank 0)."""
        if self.dist.is_main:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            with os.fdopen(os.open(self.path, flags, 0o644), "a") as fh:  # never through a link
                fh.write(to_json(record, indent=None) + "\n")

    def log_train(self, state: RunState, lr: float, seconds: float) -> None:
        """Log the window's mean loss and accuracy over ``seconds`` of training; Diverged on NaN/inf."""
        loss, acc, samples = self._reduce()
        rate = samples / seconds if seconds > 0 else float("nan")
        self.write(
            {
                "event": "train",
                "step": state.step,
                "epoch": state.step / self.steps_per_epoch,
                "loss": loss,
                "acc": acc,
                "lr": lr,
                "samples_per_s": rate,
                "train_time_s": state.train_time_s,
            }
        )
        if not math.isfinite(loss):
            raise Diverged(f"the training loss is {loss} at step {state.step}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", sps=f"{rate:.0f}")

    def log_eval(self, state: RunState) -> None:
        """Log the evaluation just recorded in ``state``."""
        self.write(
            {
                "event": "eval",
                "step": state.step,
                "epoch": state.step / self.steps_per_epoch,
                "test_accuracy": state.test_accuracy,
                "test_loss": state.test_loss,
                "eval_samples_per_s": state.eval_samples_per_s,
            }
        )
        if self.dist.is_main and self.bar is not None:
            acc, loss = 100 * state.test_accuracy, state.test_loss
            self.bar.write(
                f"step {state.step}: test accuracy {acc:.2f}%, test loss {loss:.4f}", file=sys.stderr
            )

    def truncate(self, step: int) -> None:
        """Drop records after ``step`` (and a line torn by a kill): a resumed run redoes those steps."""
        if not (self.dist.is_main and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        write_text(self.path, "".join(kept))

    # ---- progress bar ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def progress(self, initial: int, desc: str, enabled: bool) -> Iterator[None]:
        """A tqdm bar over the run's steps on rank 0 (``bar.write`` keeps messages above it)."""
        line = os.environ.get(PROGRESS_LINE_ENV, "")  # runs in parallel: one line each (train.report)
        self.bar = tqdm(
            total=self.total_steps,
            initial=initial,
            disable=not (enabled and self.dist.is_main),
            dynamic_ncols=True,
            desc=desc,
            file=sys.stderr,
            position=int(line) if line.isdigit() else None,
        )
        try:
            yield
        finally:
            self.bar.close()


class Clock:
    """Training time (steps only: evaluation and checkpoints excluded) and wall time, kept in a RunState.

    ``window()`` is the training time since it was last called (the logged samples/s).
    """

    def __init__(self, device: torch.device, state: RunState) -> None:
        self.device, self.state = device, state
        self._start, self._wall_before = time.perf_counter(), state.wall_time_s
        self._mark, self._window = self._start, 0.0

    def lap(self) -> None:
        """Add the time since the last mark to the training time; refresh the wall time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.state.train_time_s += now - self._mark
        self._window += now - self._mark
        self.state.wall_time_s = self._wall_before + (now - self._start)
        self._mark = now

    def stop(self) -> None:
        """Refresh the wall time only: the run has stopped training."""
        self.state.wall_time_s = self._wall_before + (time.perf_counter() - self._start)

    def window(self) -> float:
        self.lap()
        seconds, self._window = self._window, 0.0
        return seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (it still counts as wall time)."""
        self.lap()
        try:
            yield
        finally:
            self._mark = time.perf_counter()
