"""The training loop behind ``mita train``: AdamW, warm-up + cosine, clipping, AMP, DDP, exact resume.

A run lives in one output directory (see :mod:`mita.train.checkpoint` for the layout) and also writes
``metrics.jsonl`` (one strict-JSON record per logged step / evaluation) and ``summary.json``. Exact
resume: the checkpoint holds the weights, optimizer, scheduler, grad-scaler, every rank's RNG states and
the :class:`~mita.train.state.RunState` (step, position inside the epoch, figures so far); the sampler
order depends only on (seed, epoch), so a resumed run replays nothing and skips nothing, and its weights
equal those of an uninterrupted run. ``--resume`` on a finished run leaves it untouched.

A run stops early, with a checkpoint it can resume from and a non-zero exit, on SIGINT / SIGTERM
(:mod:`mita.train.stop`); on a non-finite loss it stops without saving anything after the last finite
step (:class:`~mita.train.errors.Diverged`).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mita.io import write_json
from mita.nn.causal_router import objective_rows
from mita.system import hardware, peak_memory

from . import checkpoint as ckpt
from . import distributed as dist_
from . import setup
from .batches import batch_size_of, forward, to_device
from .config import TrainConfig, resume_differences
from .curriculum import stage_batches
from .errors import Diverged, Interrupted, TrainError
from .evaluate import eval_sums, segmentation_report
from .full_first import full_first
from .heap import release_free_heap
from .metrics import Clock, Metrics
from .objective import IGNORE_INDEX, bits_per_byte, hits, loss_fn, sparse_targets
from .recall import mqar_routing_summary
from .runinfo import format_summary
from .state import RunState
from .stop import KILL_ENV, StopSignals, resume_command

__all__ = ["Trainer", "TrainError", "train", "format_summary", "KILL_ENV"]

# what a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("task", "attention", "model", "model_kwargs", "recipe")


class Trainer:
    """One training run; :meth:`run` returns the summary (also written to ``out/summary.json``)."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.device = dist_.process_device(config.device)
        self.dist = dist_.setup(self.device)
        self.out = Path(config.out)
        self.state = RunState()
        self.segmentation: dict[str, Any] | None = None  # the last evaluation's mIoU & co. (segmenters)
        self.sparse_targets: bool | None = None  # token targets with positions without a loss (first step)

    def run(self) -> dict[str, Any]:
        """Train to the run's last step (or continue a resumed run), evaluate, save, return the summary."""
        try:
            with setup.claim_run_dir(self.cfg, self.dist):
                self.parts = setup.build_parts(self.cfg, self.device, self.dist)
                if self.cfg.resume:
                    self._restore()
                    if self.state.step >= self.parts.total_steps and (self.out / "summary.json").is_file():
                        return self._finished()
                return self._train()
        except Diverged as err:
            raise Diverged(self._diverged(err)) from None
        finally:
            dist_.teardown()

    def _train(self) -> dict[str, Any]:
        cfg, parts, state = self.cfg, self.parts, self.state
        # before anything is written: a bad switch leaves no run
        switch = full_first(parts.model, getattr(cfg, "full_first", None), parts.total_steps)
        self.metrics = Metrics(
            self.out, dist=self.dist, device=self.device, steps_per_epoch=parts.steps_per_epoch,
            total_steps=parts.total_steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
            save_every=cfg.save_every,
        )  # fmt: skip
        self.metrics.truncate(state.step)
        if self.dist.is_main and state.step == 0:
            config = {"config": cfg.to_dict(), "meta": parts.meta, "num_params": parts.num_params}
            write_json(self.out / "config.json", config)
        self.clock = Clock(self.device, state)
        global_batch = parts.batch_size * self.dist.world_size // cfg.context_parallel
        progress = self.metrics.progress(state.step, f"{cfg.task}/{cfg.attention}", cfg.progress)
        with progress, StopSignals(self.dist, self.device, cfg.log_every) as stop:
            parts.ddp.train()
            for x, y in self._batches():
                staged = state.step < parts.curriculum_steps  # a curriculum step, before the task's epochs
                # the ranks of a context-parallel group train on one batch: count its samples once
                counted = batch_size_of(x) if self.dist.rank % cfg.context_parallel == 0 else 0
                if switch is not None:
                    switch.at(state.step)
                self.metrics.add(*self._step(x, y), counted)
                staged_batch = batch_size_of(x) * self.dist.world_size // cfg.context_parallel
                samples = staged_batch if staged else global_batch
                state.advance(samples, parts.steps_per_epoch, epoch_step=not staged)
                if self.metrics.should_log(state.step):
                    self._log()
                if self.metrics.should_eval(state.step):
                    self._evaluate()
                if self.metrics.should_save(state.step):
                    self._save()
                if stop.requested(state.step):
                    self._interrupt(stop.signum)
        return self._finish()

    # ---- the parts of a step, in the order the loop calls them ------------------------------------

    def _batches(self) -> Iterator[tuple[Any, torch.Tensor]]:
        """Device batches from the run's position on, epoch after epoch, up to the last step."""
        parts, state = self.parts, self.state
        if state.step < parts.curriculum_steps:
            for x, y in stage_batches(
                parts.curriculum, self.cfg.task, parts.data_kwargs, start=state.step,
                batch_size=parts.batch_size, seed=self.cfg.seed, rank=self.dist.rank,
                world_size=self.dist.world_size,
            ):  # fmt: skip
                yield to_device(x, self.device), y.to(self.device, non_blocking=True)
        while state.step < parts.total_steps:
            parts.sampler.set_epoch(state.epoch)
            parts.sampler.set_start(state.batch_in_epoch * parts.batch_size)
            pin = self.device.type == "cuda"
            for x, y in parts.loader(state.epoch, self.cfg.num_workers, self.cfg.seed, pin):
                yield to_device(x, self.device), y.to(self.device, non_blocking=True)
                if state.step >= parts.total_steps:
                    return

    def _step(self, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step; returns ``(loss, correct, targets)`` as device tensors (no host sync)."""
        parts = self.parts
        if self.sparse_targets is None:  # one host sync per run
            self.sparse_targets = self.cfg.context_parallel == 1 and sparse_targets(y)
        # a learned router distils where the loss reads (MQAR: the answers), not on filler rows
        read = y != IGNORE_INDEX if self.sparse_targets else None
        autocast = torch.autocast(self.device.type, dtype=parts.amp_dtype, enabled=self.cfg.amp)
        with objective_rows(parts.model, read), autocast:
            logits = forward(parts.ddp, x)
            loss = loss_fn(logits, y, label_smoothing=parts.preset.label_smoothing)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        clip = parts.meta["recipe"]["clip"]
        if clip > 0:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        return (loss.detach(), *hits(logits.detach(), y))

    def _log(self) -> None:
        self.metrics.log_train(self.state, self.parts.optimizer.param_groups[0]["lr"], self.clock.window())

    def _evaluate(self) -> None:
        self.metrics.ensure_finite(self.state.step)
        parts = self.parts
        with self.clock.paused():
            release_free_heap()  # what training freed, before evaluation's larger batches add theirs
            sums = eval_sums(
                parts.evaluator or parts.model, parts.test_set, batch_size=self.cfg.eval_batch_size,
                device=self.device, amp=self.cfg.amp,
            )  # fmt: skip
            correct, targets, loss, _ = dist_.all_reduce_sum(sums.totals(), self.dist).tolist()
            rate = parts.test_size / sums.seconds if sums.seconds > 0 else float("inf")
            self.state.record_eval(correct / targets, loss / targets, rate)
            self.metrics.log_eval(self.state)
            if sums.confusion is not None:  # a segmenter: mIoU from the test set's confusion matrix
                conf = dist_.all_reduce_sum(sums.confusion.double(), self.dist)
                self.segmentation = segmentation_report(conf)
                record = {"event": "eval_segmentation", "step": self.state.step, **self.segmentation}
                self.metrics.write(record)

    def _save(self) -> None:
        self.metrics.ensure_finite(self.state.step)  # never save weights a NaN step has touched
        parts = self.parts
        with self.clock.paused():
            self.state.note_peak_memory(peak_memory(self.device)[0])
            rngs = dist_.all_gather_object(ckpt.rng_state(), self.dist)  # collective: every rank calls it
            if self.dist.is_main:
                training_state = {
                    **self.state.state_dict(),
                    "optimizer": parts.optimizer.state_dict(),
                    "scheduler": parts.scheduler.state_dict(),
                    "scaler": parts.scaler.state_dict(),
                    "rng": rngs,
                    "config": self.cfg.to_dict(),
                }
                ckpt.save_checkpoint(
                    self.out / "checkpoints", self.state.step, parts.model, parts.meta, training_state
                )
            dist_.barrier(self.dist)

    def _interrupt(self, signum: int) -> None:
        """Log and save what the signal interrupted, then stop with :class:`Interrupted`."""
        step = self.state.step
        if not self.metrics.should_log(step):
            self._log()
        if not self.metrics.should_save(step):
            self._save()
        raise Interrupted(
            f"{signal.Signals(signum).name} at step {step}/{self.parts.total_steps}: checkpoint saved in "
            f"{self.out / 'checkpoints'}; resume with: {resume_command(self.cfg, self.dist)}",
            signum,
        )

    # ---- start and end ------------------------------------------------------------------------------

    def _restore(self) -> None:
        parts = self.parts
        meta, saved = ckpt.load_checkpoint(self.out / "checkpoints", parts.model)
        for key in RESUME_KEYS:
            if json.dumps(meta.get(key), sort_keys=True) != json.dumps(parts.meta[key], sort_keys=True):
                raise TrainError(
                    f"cannot resume {self.out}: it was trained with {key}={meta.get(key)}, this command asks "
                    f"for {key}={parts.meta[key]}; use the original settings or another --out"
                )
        self._check_resume_settings(saved.get("config"))
        try:
            parts.optimizer.load_state_dict(saved["optimizer"])
            parts.scheduler.load_state_dict(saved["scheduler"])
            parts.scaler.load_state_dict(saved["scaler"])
            rngs = saved["rng"]
            self.state = RunState.from_state_dict(saved)
        except (KeyError, ValueError) as err:
            raise ckpt.CheckpointError(
                f"{self.out / 'checkpoints'}: incomplete training state ({err})"
            ) from err
        if len(rngs) != self.dist.world_size:
            raise TrainError(
                f"checkpoint has RNG states of {len(rngs)} ranks, this run has {self.dist.world_size}"
            )
        ckpt.set_rng_state(rngs[self.dist.rank])
        if self.dist.is_main:
            print(f"resuming {self.out} at step {self.state.step}/{parts.total_steps}", file=sys.stderr)

    def _check_resume_settings(self, saved: dict[str, Any] | None) -> None:
        """TrainError when this command's settings would change the run recorded as ``saved``."""
        why = resume_differences(saved, self.cfg) if isinstance(saved, dict) else None
        if why:
            raise TrainError(why)

    def _finished(self) -> dict[str, Any]:
        """A finished run is left as it is (its summary was measured by the run that trained it)."""
        setup.note(
            f"{self.out} is a finished run (step {self.state.step}/{self.parts.total_steps}); nothing to do",
            self.dist,
        )
        return json.loads((self.out / "summary.json").read_text())

    def _finish(self) -> dict[str, Any]:
        self.clock.stop()
        peak, peak_kind = peak_memory(self.device)
        self.state.note_peak_memory(peak)
        parts, state = self.parts, self.state
        summary = {
            "task": self.cfg.task,
            "attention": self.cfg.attention,
            "preset": parts.preset.name,
            "model": parts.meta["model"],
            "model_kwargs": parts.meta["model_kwargs"],
            "num_params": parts.num_params,
            "test_accuracy": state.test_accuracy,
            "best_test_accuracy": state.best_test_accuracy,
            "test_loss": state.test_loss,
            "test_bits_per_byte": bits_per_byte(state.test_loss, parts.bytes_per_token),
            **(self.segmentation or {}),
            "steps": state.step,
            "epochs": state.step / parts.steps_per_epoch,
            "wall_time_s": state.wall_time_s,
            "train_time_s": state.train_time_s,
            "train_samples_per_s": state.samples_seen / state.train_time_s
            if state.train_time_s > 0
            else None,
            "eval_samples_per_s": state.eval_samples_per_s,
            "peak_memory_bytes": state.peak_memory_bytes,
            "peak_memory_kind": peak_kind,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
            "recipe": parts.meta["recipe"],
            "hardware": hardware(self.device),
            "torch_version": torch.__version__,
        }
        if self.cfg.task == "mqar":  # routing recall per layer of causal MiTA, split, with chance and oracle
            routing = mqar_routing_summary(parts.model, parts.test_set)
            if routing:
                summary["routing_recall"] = routing
        if self.dist.is_main:
            meta = {**parts.meta, "step": state.step, "test_accuracy": state.test_accuracy}
            with ckpt.writing(self.out / "model.safetensors"):
                ckpt.save_model_file(self.out / "model.safetensors", parts.model, meta)
            with ckpt.writing(self.out / "summary.json"):
                write_json(self.out / "summary.json", summary, default=str)
        return summary

    def _diverged(self, err: Diverged) -> str:
        last = ckpt.latest_step(self.out / "checkpoints")
        kept = (
            f"the last good checkpoint is step {last} in {self.out / 'checkpoints'}"
            if last
            else "no checkpoint"
        )
        lr = self.parts.meta["recipe"]["lr"]
        return (
            f"training diverged: {err}; stopped with {kept}; try a lower --lr than {lr} or a longer --warmup"
        )


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` (see :class:`TrainConfig`) and return the summary dict written to ``summary.json``."""
    return Trainer(config).run()
