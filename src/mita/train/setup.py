"""Set-up of a run: claim its directory, then build data, model, optimizer and schedule.

:func:`claim_run_dir` checks the output directory (writable; a run already there needs ``--resume``;
``--resume`` needs a checkpoint) and locks it for the run, so two runs on one ``--out`` cannot interleave.
:func:`build_parts` returns everything the loop needs as one :class:`Parts`.

Run length: ``--epochs`` (else the preset's epochs or steps) sets it; ``--max-steps`` shortens it, and
the schedule then ends there. A ``--max-steps`` beyond the run's length does not lengthen it (that is
what ``--epochs`` is for): the run says so and stops at its own length. With ``--curriculum`` (MQAR),
the stages come first and ``--max-steps`` is the task's own steps after them (:mod:`.curriculum`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from mita.data import build_dataset, get_task
from mita.data.paths import recorded_data_kwargs

from . import checkpoint as ckpt
from . import distributed as dist_
from .config import TrainConfig, resume_differences
from .curriculum import Stage, parse_curriculum
from .errors import TrainError
from .init_from import apply
from .presets import Preset, build, causal_overrides, get_preset, model_spec
from .sampler import ResumableSampler
from .schedule import warmup_cosine

LOCK = ".lock"


def note(message: str, dist: dist_.DistInfo) -> None:
    """A one-line note on stderr from rank 0."""
    if dist.is_main:
        print(f"note: {message}", file=sys.stderr)


# ---- the run directory ------------------------------------------------------------------------------


#: What a mita run directory may hold before its first checkpoint (any run writes ``config.json`` first).
RUN_FILES = frozenset(
    {LOCK, "config.json", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoints"}
)


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is the ``config.json`` a mita run wrote (a JSON object with its keys)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"config", "meta", "num_params"} <= set(data)


def recorded_config(out: Path) -> dict[str, Any] | None:
    """The settings a run recorded in its ``config.json`` (None when absent or not a run's)."""
    path = out / "config.json"
    if not _is_run_config(path):
        return None
    config = json.loads(path.read_text())["config"]
    return config if isinstance(config, dict) else None


def _not_a_run(out: Path) -> str | None:
    """Why ``out`` must not be used as a new run's directory: it holds files that no mita run wrote."""
    if not out.is_dir():
        return None
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in RUN_FILES]
    if names and names != [LOCK] and (foreign or not _is_run_config(out / "config.json")):
        shown = ", ".join((foreign or names)[:5]) + (", ..." if len(foreign or names) > 5 else "")
        return (
            f"{out} is not empty and holds no mita run (found {shown}); choose a new or empty --out, "
            "mita train would overwrite files there"
        )
    return None


def _check_run_dir(cfg: TrainConfig) -> str | None:
    """None when ``cfg.out`` can hold this run, else why not."""
    out = Path(cfg.out)
    has_ckpt = ckpt.latest_step(out / "checkpoints") is not None
    if cfg.resume and not has_ckpt:
        return (
            f"nothing to resume in {out}: it holds no checkpoint (checkpoints/{ckpt.LATEST}); check --out, "
            "or drop --resume to start a new run"
        )
    if has_ckpt and not cfg.resume:
        return (
            f"{out} already holds a run (checkpoints/{ckpt.LATEST}); pass --resume to continue it "
            "or choose another --out"
        )
    if not has_ckpt and (why := _not_a_run(out)):
        return why
    if cfg.resume and (saved := recorded_config(out)) is not None:  # before anything is built
        if why := resume_differences(saved, cfg):
            return why
    links = [name for name in (LOCK, "metrics.jsonl") if (out / name).is_symlink()]
    if links:
        link = out / links[0]
        return f"{link} is a link, which mita does not write through; remove it or choose another --out"
    return _probe_writable(out)


def _probe_writable(out: Path) -> str | None:
    """Create ``out`` if needed and a file in it; None when that works, else why not. The probe file has
    a fresh name and is created exclusively (never through a link), then removed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"output directory {out} is not writable ({err.strerror or err})"
    return None


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file without following a link; TrainError for anything but mita's own
    lock: a regular file with one link holding nothing but a process id."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        raise TrainError(
            f"cannot open the lock file {path} ({err.strerror or err}); a link there is not followed: "
            "remove it or choose another --out"
        ) from None
    st = os.fstat(fd)
    ok = stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size <= 32
    if ok and st.st_size:
        ok = os.pread(fd, 32, 0).strip().isdigit()
    if not ok:
        os.close(fd)
        raise TrainError(
            f"{path} is not a mita lock file (a link or another file); remove it or choose another --out"
        )
    return fd


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock`` (released when the process ends, however it ends)."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with os.fdopen(_open_lock(out / LOCK), "r+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            raise TrainError(
                f"{out} is in use by another mita train (pid {pid}); wait for it or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()  # mita's own lock file (checked by _open_lock)
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def _missing_dirs(out: Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet, deepest first (what claiming ``out`` creates)."""
    missing = []
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _undo_claim(out: Path, lock_created: bool, created: list[Path]) -> None:
    """A run that failed before writing anything leaves no trace: the lock file and directories it
    created are removed while they hold nothing else."""
    try:
        if lock_created and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
        for d in created:
            d.rmdir()  # OSError when not empty: kept
    except OSError:
        pass


@contextlib.contextmanager
def claim_run_dir(cfg: TrainConfig, dist: dist_.DistInfo) -> Iterator[Path]:
    """Check ``cfg.out`` (rank 0, decision shared with all ranks) and lock it for the run.

    If the run fails before it writes a file (settings that only the data or model can check), the lock
    file and the directories the claim created are removed again: bad settings leave no run directory."""
    out = Path(cfg.out)
    created = _missing_dirs(out)
    lock_created = not (out / LOCK).exists()
    with contextlib.ExitStack() as stack:
        err = None
        if dist.is_main:
            try:
                err = _check_run_dir(cfg)
                if err is None:
                    stack.enter_context(_lock(out))
                    stack.callback(_undo_claim, out, lock_created, created)
            except (TrainError, ckpt.CheckpointError) as exc:
                err = str(exc)
        err = dist_.broadcast_object(err, dist)
        if err:
            raise TrainError(err)
        yield out


# ---- the parts of a run -----------------------------------------------------------------------------


@dataclass
class Parts:
    """What :func:`build_parts` made for one run."""

    preset: Preset
    model: nn.Module  # the plain module: weights, evaluation, checkpoints
    ddp: nn.Module  # what the training step calls: the DDP wrapper, or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    train_set: Dataset
    sampler: ResumableSampler
    test_set: Dataset  # this rank's shard of the test set
    test_size: int  # the whole test set
    batch_size: int  # per process
    steps_per_epoch: int
    total_steps: int
    meta: dict[str, Any]  # stored in every weights file: how to rebuild the model and its data
    num_params: int
    bytes_per_token: float | None  # language-model tasks: turns the test loss into bits per byte
    evaluator: nn.Module | None = None  # what evaluation calls instead of ``model`` (context parallel)
    curriculum: list[Stage] | None = None  # MQAR stages trained before the task (mita.train.curriculum)
    curriculum_steps: int = 0  # their steps, the first of total_steps
    data_kwargs: dict[str, Any] | None = None  # the task's data keywords (the stages keep all but the sizes)

    def loader(self, epoch: int, num_workers: int, seed: int, pin_memory: bool) -> DataLoader:
        """This epoch's training batches, from the sampler's position on."""
        g = torch.Generator()
        g.manual_seed(seed * 100_003 + epoch)  # worker seeds depend on (seed, epoch) only
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            generator=g,
            pin_memory=pin_memory,
            persistent_workers=False,
        )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-d tensors (biases, norms) nor on what the model names in
    ``no_weight_decay()`` (timm's hook: position embeddings, class tokens); for a model without the
    hook, on names containing ``pos``, ``cls_token``, ``register`` or ``norm``."""
    named = getattr(model, "no_weight_decay", None)
    skip_names = set(named()) if callable(named) else None
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if skip_names is not None:
            skip = p.ndim < 2 or name in skip_names
        else:
            skip = p.ndim < 2 or any(t in name for t in ("pos", "cls_token", "register", "norm"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _run_length(cfg: TrainConfig, preset: Preset, steps_per_epoch: int, dist: dist_.DistInfo) -> int:
    if cfg.epochs is not None:
        total = cfg.epochs * steps_per_epoch
    elif preset.steps is not None:
        total = preset.steps
    else:
        total = preset.epochs * steps_per_epoch
    if cfg.max_steps is not None and cfg.max_steps > total:
        note(
            f"--max-steps {cfg.max_steps} is more than this run's {total} steps, which it stops at "
            "(--epochs makes a run longer)",
            dist,
        )
    return min(total, cfg.max_steps or total)


def _data(cfg: TrainConfig, preset: Preset) -> tuple[Dataset, Dataset, Any, dict[str, Any]]:
    """``(train, test, task info, data keywords to store)``."""
    # the data set's own seed stays at its canonical value unless given (--data-arg seed=N)
    kw = {**preset.data_kwargs, **cfg.data_kwargs}
    if cfg.data_root:
        kw["root"] = cfg.data_root
    if cfg.cache_dir:
        kw["cache_dir"] = cfg.cache_dir
    train = build_dataset(cfg.task, "train", size=cfg.train_size, **kw)
    test = build_dataset(cfg.task, "test", size=cfg.test_size, **{**kw, "augment": False})
    info = getattr(train, "info", None) or get_task(cfg.task)
    # stored: how to build the data, not this machine's cache directory (mita.data.paths)
    return train, test, info, recorded_data_kwargs({k: v for k, v in kw.items() if k != "augment"})


def _model(cfg: TrainConfig, preset: Preset, info: Any) -> tuple[str, dict[str, Any], nn.Module]:
    """``(builder, keywords, model)``: the builder and keywords go to the checkpoint to rebuild it."""
    attn = {"num_landmarks": cfg.num_landmarks, "topk": cfg.topk, **causal_overrides(cfg)}
    builder, kwargs = model_spec(preset, info, cfg.attention, attn, cfg.model_kwargs)
    try:
        return builder, kwargs, build(builder, kwargs)
    except TypeError as err:
        raise TrainError(f"cannot build {builder} with {kwargs}: {err}") from err


def build_parts(cfg: TrainConfig, device: torch.device, dist: dist_.DistInfo) -> Parts:
    """Data, model, optimizer, schedule and grad scaler of the run ``cfg`` describes."""
    preset = get_preset(cfg.task, cfg.preset)
    train, test, info, data_kwargs = _data(cfg, preset)
    batch_size = cfg.batch_size or preset.batch_size
    # the ranks of one context-parallel group share their batches
    replicas, replica = dist_.data_parallel(dist, cfg.context_parallel)
    sampler = ResumableSampler(train, num_replicas=replicas, rank=replica, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch < 1:
        raise TrainError(
            f"the training set ({len(train)} samples over {replicas} process(es)) is smaller than one "
            f"batch of {batch_size}"
        )
    stages = parse_curriculum(getattr(cfg, "curriculum", None))
    curriculum_steps = sum(st.steps for st in stages)
    # with a curriculum, --max-steps is the task's own steps after the stages
    main_steps = (
        cfg.max_steps if stages and cfg.max_steps else _run_length(cfg, preset, steps_per_epoch, dist)
    )
    total_steps = curriculum_steps + main_steps
    # each rank (context parallel: each group) evaluates a disjoint shard; counts are summed over ranks
    test_shard = Subset(test, range(replica, len(test), replicas)) if replicas > 1 else test

    ckpt.seed_all(cfg.seed)  # identical initial weights on every rank
    builder, model_kwargs, model = _model(cfg, preset, info)
    extra_meta = {}
    if getattr(cfg, "init_from", None) or getattr(cfg, "attn_only", False):
        extra_meta = apply(model, cfg, resuming=cfg.resume, log=lambda msg: note(msg, dist))
    model = model.to(device)
    ckpt.seed_all(cfg.seed * 1000 + 1 + dist.rank)  # per-rank dropout / augmentation streams

    lr = cfg.lr if cfg.lr is not None else preset.lr
    wd = cfg.weight_decay if cfg.weight_decay is not None else preset.weight_decay
    warm = cfg.warmup_frac if cfg.warmup_frac is not None else preset.warmup_frac
    clip = cfg.clip if cfg.clip is not None else preset.clip
    optimizer = torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=(0.9, 0.999))
    scheduler = warmup_cosine(optimizer, total_steps, int(round(warm * total_steps)))
    if cfg.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp_dtype = torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype == torch.float16)
    if cfg.amp and device.type == "cpu":
        note("--amp on CPU autocasts to bfloat16 (often slower than float32 there)", dist)
    meta = {
        "task": cfg.task,
        "attention": cfg.attention,
        "model": builder,
        "model_kwargs": model_kwargs,
        "preset": preset.name,
        "task_info": dict(vars(info)) if hasattr(info, "__dict__") else {},
        "data_kwargs": data_kwargs,
        "recipe": {
            "batch_size": batch_size,
            "world_size": dist.world_size,
            "total_steps": total_steps,
            "lr": lr,
            "weight_decay": wd,
            "warmup_frac": warm,
            "clip": clip,
            "label_smoothing": preset.label_smoothing,
            "seed": cfg.seed,
            "train_size": len(train),
            **({"curriculum": cfg.curriculum} if stages else {}),
        },
        **extra_meta,
    }
    if cfg.context_parallel > 1:
        meta["recipe"]["context_parallel"] = cfg.context_parallel
    ddp = evaluator = dist_.context_parallel(model, dist, cfg.context_parallel)
    if dist.enabled:
        ddp = DistributedDataParallel(ddp, device_ids=[device.index] if device.type == "cuda" else None)
    return Parts(
        preset=preset,
        model=model,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        amp_dtype=amp_dtype,
        train_set=train,
        sampler=sampler,
        test_set=test_shard,
        test_size=len(test),
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        meta=meta,
        num_params=sum(p.numel() for p in model.parameters()),
        bytes_per_token=getattr(info, "bytes_per_token", None),
        evaluator=evaluator if evaluator is not model else None,
        curriculum=stages,
        curriculum_steps=curriculum_steps,
        data_kwargs={
            **preset.data_kwargs,
            **cfg.data_kwargs,
            **({"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}),
        },
    )
