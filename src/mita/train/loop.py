"""The training loop behind ``mita train``: AdamW, warm-up + cosine, clipping, AMP, DDP, exact resume.

A run lives in one output directory (see :mod:`mita.train.checkpoint` for the layout) and also writes
``metrics.jsonl`` (one JSON record per logged step / evaluation) and ``summary.json``. Exact resume:
the checkpoint holds the weights, optimizer, scheduler, grad-scaler, every rank's RNG states, the step
and the position inside the epoch; the sampler order depends only on (seed, epoch), so a resumed run
replays nothing and skips nothing, and its weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import checkpoint as ckpt
from . import distributed as dist_
from .batches import batch_size_of, forward, to_device
from .config import TrainConfig
from .evaluate import count_correct
from .presets import Preset, build, get_preset, model_spec
from .runinfo import hardware, peak_memory
from .sampler import ResumableSampler
from .schedule import warmup_cosine

# Test hook: simulate a hard kill (SIGKILL-like, no clean-up) right after this optimizer step.
KILL_ENV = "MITA_TRAIN_KILL_AT_STEP"


class TrainError(RuntimeError):
    """A run cannot start or continue (bad settings, unusable output directory, mismatched resume)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; with torchrun on CUDA, the local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda was requested but no CUDA device is available")
        if device.index is None and dist_.launched_by_torchrun():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings of positions and class/register tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(t in name for t in ("pos", "cls_token", "register", "norm"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_out_dir(out: Path) -> str | None:
    """None when ``out`` can be created and written, else why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        return f"output directory {out} is not writable ({err.strerror or err})"
    return None


class Trainer:
    """One training run; :meth:`run` returns the summary (also written to ``out/summary.json``)."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.device = resolve_device(config.device)
        self.dist = dist_.setup(self.device)
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.main = self.dist.is_main

    # ---- set-up ----------------------------------------------------------------------------------

    def _datasets(self) -> tuple[Dataset, Dataset, Any]:
        from mita.data import build_dataset, get_task

        cfg = self.cfg
        # the data set's own seed stays at its canonical value unless given (--data-arg seed=N)
        kw = {**self.preset.data_kwargs, **cfg.data_kwargs}
        if cfg.data_root:
            kw["root"] = cfg.data_root
        if cfg.cache_dir:
            kw["cache_dir"] = cfg.cache_dir
        self.data_kwargs = {k: v for k, v in kw.items() if k != "augment"}
        train = build_dataset(cfg.task, "train", size=cfg.train_size, **kw)
        kw["augment"] = False
        test = build_dataset(cfg.task, "test", size=cfg.test_size, **kw)
        info = getattr(train, "info", None) or get_task(cfg.task)
        return train, test, info

    def _recipe(self, preset: Preset, steps_per_epoch: int) -> int:
        cfg = self.cfg
        if cfg.epochs is not None:
            if cfg.epochs < 1:
                raise TrainError(f"--epochs must be >= 1, got {cfg.epochs}")
            total = cfg.epochs * steps_per_epoch
        elif preset.steps is not None:
            total = preset.steps
        else:
            total = preset.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            if cfg.max_steps < 1:
                raise TrainError(f"--max-steps must be >= 1, got {cfg.max_steps}")
            total = min(total, cfg.max_steps)
        return total

    def _setup(self) -> None:
        cfg = self.cfg
        preset = get_preset(cfg.task, cfg.model)  # ValueError on unknown task/preset
        self.preset = preset
        err = _check_out_dir(self.out) if self.main else None
        err = dist_.broadcast_object(err, self.dist)
        if err:
            raise TrainError(err)
        has_ckpt = ckpt.latest_step(self.ckpt_dir) is not None
        if has_ckpt and not cfg.resume:
            raise TrainError(
                f"{self.out} already holds a run (checkpoints/latest.json); pass --resume to continue it "
                "or choose another --out"
            )

        train, test, info = self._datasets()
        self.info = info
        self.batch_size = cfg.batch_size or preset.batch_size
        world = self.dist.world_size
        self.sampler = ResumableSampler(
            train, num_replicas=world, rank=self.dist.rank, shuffle=True, seed=cfg.seed
        )
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        if self.steps_per_epoch < 1:
            raise TrainError(
                f"the training set ({len(train)} samples over {world} process(es)) is smaller than one "
                f"batch of {self.batch_size}"
            )
        self.total_steps = self._recipe(preset, self.steps_per_epoch)
        self.train_set = train
        # each rank evaluates a disjoint shard; counts are summed over ranks
        self.test_shard = Subset(test, range(self.dist.rank, len(test), world)) if world > 1 else test
        self.test_size = len(test)

        _seed_all(cfg.seed)  # identical initial weights on every rank
        attn = {"num_landmarks": cfg.num_landmarks, "topk": cfg.topk}
        self.builder, self.model_kwargs = model_spec(preset, info, cfg.attention, attn, cfg.model_kwargs)
        try:
            model = build(self.builder, self.model_kwargs)
        except TypeError as err:
            raise TrainError(f"cannot build {self.builder} with {self.model_kwargs}: {err}") from err
        self.model = model.to(self.device)
        self.num_params = sum(p.numel() for p in model.parameters())
        _seed_all(cfg.seed * 1000 + 1 + self.dist.rank)  # per-rank dropout / augmentation streams

        lr = cfg.lr if cfg.lr is not None else preset.lr
        wd = cfg.weight_decay if cfg.weight_decay is not None else preset.weight_decay
        warm = cfg.warmup_frac if cfg.warmup_frac is not None else preset.warmup_frac
        self.clip = cfg.clip if cfg.clip is not None else preset.clip
        self.lr = lr
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, wd), lr=lr, betas=(0.9, 0.999))
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, int(round(warm * self.total_steps)))
        use_amp = cfg.amp
        if use_amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.amp_dtype = torch.bfloat16
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=use_amp and self.amp_dtype == torch.float16
        )
        self.meta = {
            "task": cfg.task,
            "attention": cfg.attention,
            "model": self.builder,
            "model_kwargs": self.model_kwargs,
            "preset": preset.name,
            "task_info": {k: v for k, v in vars(info).items()} if hasattr(info, "__dict__") else {},
            "data_kwargs": {k: v for k, v in self.data_kwargs.items()},
            "recipe": {
                "batch_size": self.batch_size,
                "world_size": world,
                "total_steps": self.total_steps,
                "lr": lr,
                "weight_decay": wd,
                "warmup_frac": warm,
                "clip": self.clip,
                "label_smoothing": preset.label_smoothing,
                "seed": cfg.seed,
                "train_size": len(train),
            },
        }
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp = self.model

    # ---- state -----------------------------------------------------------------------------------

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = _rng_state()
        if not self.dist.enabled:
            return [state]
        out: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(out, state)
        return out

    def _save(self) -> None:
        rngs = self._gather_rng()  # collective: every rank calls it
        if self.main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "best_test_accuracy": self.best_acc,
                "last_test_accuracy": self.last_acc,
                "last_eval_step": self.last_eval_step,
                "train_time_s": self.train_time,
                "wall_time_s": self.prior_wall + (time.perf_counter() - self.t_start),
                "samples_seen": self.samples_seen,
                "config": self.cfg.to_dict(),
            }
            ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.meta, state)
        dist_.barrier(self.dist)

    def _restore(self) -> None:
        meta, state = ckpt.load_checkpoint(self.ckpt_dir, self.model)
        for key in ("task", "attention", "model", "model_kwargs", "recipe"):
            if json.dumps(meta.get(key), sort_keys=True) != json.dumps(self.meta[key], sort_keys=True):
                raise TrainError(
                    f"cannot resume {self.out}: it was trained with {key}={meta.get(key)}, this command asks "
                    f"for {key}={self.meta[key]}; use the original settings or another --out"
                )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) != self.dist.world_size:
            raise TrainError(
                f"checkpoint has RNG states of {len(rngs)} ranks, this run has {self.dist.world_size}"
            )
        _set_rng_state(rngs[self.dist.rank])
        self.step = state["step"]
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.best_acc, self.last_acc = state["best_test_accuracy"], state["last_test_accuracy"]
        self.last_eval_step = state["last_eval_step"]
        self.train_time, self.prior_wall = state["train_time_s"], state["wall_time_s"]
        self.samples_seen = state["samples_seen"]

    # ---- logging ---------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop records written after the checkpoint we resume from (they will be redone)."""
        path = self.out / "metrics.jsonl"
        if not (self.main and path.exists()):
            return
        kept = [
            ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step
        ]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)

    # ---- evaluation ------------------------------------------------------------------------------

    def _evaluate(self) -> float:
        correct, n, seconds = count_correct(
            self.model,
            self.test_shard,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            amp=self.cfg.amp,
        )
        totals = dist_.all_reduce_sum(
            torch.stack([correct.double(), torch.tensor(float(n), dtype=torch.float64, device=self.device)]),
            self.dist,
        )
        acc = float(totals[0] / totals[1])
        self.last_acc, self.last_eval_step = acc, self.step
        self.best_acc = max(self.best_acc, acc)
        self.eval_rate = self.test_size / seconds if seconds > 0 else float("inf")
        self._log(
            {
                "event": "eval",
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "test_accuracy": acc,
                "eval_samples_per_s": self.eval_rate,
            }
        )
        return acc

    # ---- main loop -------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        g = torch.Generator()
        g.manual_seed(self.cfg.seed * 100_003 + self.epoch)  # worker seeds depend on (seed, epoch) only
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.cfg.num_workers,
            generator=g,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _train_step(self, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp):
            logits = forward(self.ddp, x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.preset.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), (logits.argmax(-1) == y).sum()

    def _tick(self) -> None:
        """Add the time since ``t0`` to the training time and restart the clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.train_time += now - self.t0
        self.t_log += now - self.t0
        self.t0 = now

    def run(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or continue a resumed run), evaluate, save, return the summary."""
        try:
            return self._run()
        finally:
            dist_.teardown()

    def _run(self) -> dict[str, Any]:
        self._setup()
        cfg = self.cfg
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_acc, self.last_acc, self.last_eval_step = 0.0, float("nan"), -1
        self.train_time, self.prior_wall, self.samples_seen, self.eval_rate = 0.0, 0.0, 0, float("nan")
        self.t_start = time.perf_counter()
        if cfg.resume and ckpt.latest_step(self.ckpt_dir) is not None:
            self._restore()
            if self.main:
                print(f"resuming {self.out} at step {self.step}/{self.total_steps}", file=sys.stderr)
        self._truncate_metrics()
        if self.main and self.step == 0:
            (self.out / "config.json").write_text(
                json.dumps(
                    {"config": cfg.to_dict(), "meta": self.meta, "num_params": self.num_params}, indent=2
                )
                + "\n"
            )
        if cfg.amp and self.device.type == "cpu" and self.main:
            print(
                "note: --amp on CPU autocasts to bfloat16 (often slower than float32 there)", file=sys.stderr
            )

        kill_at = int(os.environ.get(KILL_ENV, "-1"))
        global_batch = self.batch_size * self.dist.world_size
        save_every = cfg.save_every or self.steps_per_epoch
        eval_every = cfg.eval_every or self.steps_per_epoch
        from tqdm import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.main and cfg.progress),
            dynamic_ncols=True,
            desc=f"{cfg.task}/{cfg.attention}",
            file=sys.stderr,
        )
        acc_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        acc_correct = torch.zeros((), dtype=torch.float64, device=self.device)
        acc_n, self.t_log = 0, 0.0
        self.ddp.train()
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.batch_in_epoch * self.batch_size)
            self.t0 = time.perf_counter()
            for x, y in self._loader():
                x, y = to_device(x, self.device), y.to(self.device, non_blocking=True)
                loss, correct = self._train_step(x, y)
                n = batch_size_of(x)
                acc_loss += loss.double() * n
                acc_correct += correct.double()
                acc_n += n
                self.step += 1
                self.batch_in_epoch += 1
                self.samples_seen += global_batch
                bar.update(1)
                done = self.step >= self.total_steps
                epoch_end = self.batch_in_epoch >= self.steps_per_epoch
                if self.step % cfg.log_every == 0 or done or epoch_end:
                    self._tick()
                    n_t = torch.tensor(float(acc_n), device=self.device, dtype=torch.float64)
                    stats = dist_.all_reduce_sum(torch.stack([acc_loss, acc_correct, n_t]), self.dist)
                    loss_avg, acc_avg = float(stats[0] / stats[2]), float(stats[1] / stats[2])
                    rate = float(stats[2]) / self.t_log if self.t_log > 0 else float("nan")
                    lr = self.optimizer.param_groups[0]["lr"]
                    self._log(
                        {
                            "event": "train",
                            "step": self.step,
                            "epoch": self.step / self.steps_per_epoch,
                            "loss": loss_avg,
                            "acc": acc_avg,
                            "lr": lr,
                            "samples_per_s": rate,
                            "train_time_s": self.train_time,
                        }
                    )
                    bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc_avg:.3f}", sps=f"{rate:.0f}")
                    acc_loss.zero_()
                    acc_correct.zero_()
                    acc_n, self.t_log = 0, 0.0
                if epoch_end:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                do_eval = self.step % eval_every == 0 or epoch_end or done
                do_save = self.step % save_every == 0 or epoch_end or done
                if do_eval or do_save:
                    self._tick()  # evaluation and checkpointing are not training time
                    if do_eval:
                        self._evaluate()
                        if self.main:
                            msg = f"step {self.step}: test accuracy {100 * self.last_acc:.2f}%"
                            bar.write(msg, file=sys.stderr)
                    if do_save:
                        self._save()
                    self.t0 = time.perf_counter()
                if self.step == kill_at:
                    bar.close()
                    sys.stderr.flush()
                    os._exit(137)
                if done or epoch_end:
                    break
        bar.close()
        if self.last_eval_step != self.step:
            self._evaluate()
            self._save()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        peak, peak_kind = peak_memory(self.device)
        wall = self.prior_wall + (time.perf_counter() - self.t_start)
        summary = {
            "task": self.cfg.task,
            "attention": self.cfg.attention,
            "preset": self.preset.name,
            "model": self.builder,
            "model_kwargs": self.model_kwargs,
            "num_params": self.num_params,
            "test_accuracy": self.last_acc,
            "best_test_accuracy": self.best_acc,
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "wall_time_s": wall,
            "train_time_s": self.train_time,
            "train_samples_per_s": self.samples_seen / self.train_time
            if self.train_time > 0
            else float("nan"),
            "eval_samples_per_s": self.eval_rate,
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
            "recipe": self.meta["recipe"],
            "hardware": hardware(self.device),
            "torch_version": torch.__version__,
        }
        if self.main:
            ckpt.save_model_file(
                self.out / "model.safetensors",
                self.model,
                {**self.meta, "step": self.step, "test_accuracy": self.last_acc},
            )
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            os.replace(tmp, self.out / "summary.json")
        return summary


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` (see :class:`TrainConfig`) and return the summary dict written to ``summary.json``."""
    return Trainer(config).run()


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the end of a run."""
    mem = summary["peak_memory_bytes"] / 2**20
    return (
        f"task {summary['task']} attention {summary['attention']} (preset {summary['preset']}, "
        f"{summary['num_params'] / 1e6:.2f}M params)\n"
        f"test accuracy {100 * summary['test_accuracy']:.2f}% "
        f"(best {100 * summary['best_test_accuracy']:.2f}%) "
        f"after {summary['steps']} steps ({summary['epochs']:.2f} epochs)\n"
        f"wall time {summary['wall_time_s']:.1f} s, train {summary['train_samples_per_s']:.1f} samples/s, "
        f"eval {summary['eval_samples_per_s']:.1f} samples/s, peak memory {mem:.0f} MiB "
        f"({summary['peak_memory_kind']})"
    )


def steps_for_epochs(epochs: float, train_size: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps of ``epochs`` epochs (drop-last batches)."""
    return max(1, math.floor(epochs * (train_size // world_size // batch_size)))
