"""``mita train``: train a model on a task with a chosen attention; see ``mita train --help``.

Multi-process / multi-GPU: ``torchrun --nproc_per_node=N -m mita train ...`` (DDP; gloo on CPU, nccl
on CUDA; rank 0 logs and writes checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from mita.data import DATA_TASKS, TASKS, get_task
from mita.data.imagefolder import folder_info_for
from mita.data.scenes import scene_config, scene_info
from mita.deps import require

from ..system import positive_int
from .batches import forward
from .checkpoint import CheckpointError
from .config import TrainConfig
from .init_from import init_from
from .loop import TrainError, format_summary, train
from .presets import PRESETS, Preset, attention_kinds, build, causal_overrides, get_preset, model_spec


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when possible (numbers, true/false, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def build_parser() -> argparse.ArgumentParser:
    """The ``mita train`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mita train",
        description="Train a classifier on a task with MiTA or a baseline attention. "
        "Multi-GPU/multi-process: torchrun --nproc_per_node=N -m mita train ...",
    )

    # choices come from the registries, so a newly registered task or attention kind is trainable at once
    p.add_argument("--task", required=True, choices=[*TASKS, *DATA_TASKS])
    p.add_argument("--attention", default="mita", choices=attention_kinds())
    p.add_argument("--preset", help=f"model preset (default: the task's); one of {', '.join(PRESETS)}")
    p.add_argument("--num-landmarks", type=positive_int, help="m: landmarks (MiTA, Agent)")
    p.add_argument("--topk", type=positive_int, help="k: keys per routed expert (MiTA) / per query (top-k)")
    p.add_argument("--block-size", type=positive_int, help="b: block size of the causal kinds (GPT presets)")
    p.add_argument(
        "--landmark-horizon",
        choices=("prefix", "frozen"),
        help="causal MiTA's landmark horizon (GPT presets)",
    )
    p.add_argument(
        "--curriculum", metavar="LEN:PAIRS:STEPS[:BATCH],...",
        help="MQAR: stages trained before the task (short sequences, few pairs first); --max-steps then sets "
        "the task's own steps after them, one learning-rate schedule spans all",
    )  # fmt: skip
    p.add_argument(
        "--full-first", type=positive_int, metavar="STEPS",
        help="GPT causal kinds: full attention for the first STEPS optimizer steps, then --attention's kind "
        "(same weights, optimizer and schedule: until then the full-attention run of the same seed)",
    )  # fmt: skip
    p.add_argument("--epochs", type=positive_int, help="epochs (default: the preset's epochs or steps)")
    p.add_argument(
        "--max-steps", type=positive_int, help="stop after N optimizer steps (the schedule ends there)"
    )
    p.add_argument("--batch-size", type=positive_int, help="per-process batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=float, dest="warmup_frac", help="warm-up as a fraction of all steps")
    p.add_argument("--clip", type=float, help="gradient-norm clip (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default runs/TASK-ATTENTION-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16, or fp16 + grad scaling)")
    p.add_argument(
        "--data-root",
        help="data directory of a file-based task (default $MITA_FMNIST_DIR / $MITA_TEXT_DIR, else the "
        "installed package's); recorded in the checkpoint, overridable by mita eval --data-root",
    )
    p.add_argument("--cache-dir", help="cache of generated tasks (default $MITA_CACHE or ~/.cache/mita)")
    p.add_argument("--train-size", type=positive_int, help="use only N training samples")
    p.add_argument("--test-size", type=positive_int, help="evaluate on only N test samples")
    p.add_argument(
        "--data-arg",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra build_dataset keyword (repeatable), e.g. seq_len=512",
    )
    p.add_argument(
        "--model-arg",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset's model keyword (repeatable), e.g. depth=2",
    )
    p.add_argument(
        "--eval-every",
        type=positive_int,
        help="also evaluate every N steps (always: each epoch's end and the end)",
    )
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N steps (default: each epoch)")
    p.add_argument("--log-every", type=positive_int, default=50, help="log metrics every N steps")
    p.add_argument("--eval-batch-size", type=positive_int, default=256)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        dest="num_workers",
        help="data-loader workers (0: exact resume even with augmentation)",
    )
    p.add_argument("--img-size", type=positive_int, help="imagefolder: image side (= --data-arg img_size=N)")
    p.add_argument(
        "--init-from", metavar="PATH",
        help="start from these weights (mita run dir or .safetensors of any attention kind, or a timm-key "
        "state dict: .safetensors, or .pt/.pth read weights-only); fresh optimizer and schedule",
    )  # fmt: skip
    p.add_argument("--attn-only", action="store_true", help="train only attention, head and pos_embed")
    p.add_argument("--resize-pos-embed", action="store_true", help="resample --init-from's pos_embed grid")
    p.add_argument("--new-head", action="store_true", help="re-create --init-from's head for this task")
    p.add_argument(
        "--context-parallel", type=positive_int, default=1, metavar="P",
        help="split each sequence across P consecutive torchrun processes (MiTA sequence tasks; the world "
        "size / P groups are data parallel)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed arguments."""
    values = vars(args).copy()
    values["data_kwargs"] = dict(values.pop("data_arg"))
    values["model_kwargs"] = dict(values.pop("model_arg"))
    if values.get("img_size") is not None:  # a shorthand for the data argument
        values["data_kwargs"]["img_size"] = values["img_size"]
    values.pop("img_size", None)
    if values["out"] is None:
        values["out"] = f"runs/{args.task}-{args.attention}-s{args.seed}"
    return TrainConfig(**values)


def preflight(config: TrainConfig) -> None:
    """Everything that can fail before training, checked before the run directory is created: the
    settings (:meth:`TrainConfig.validate`), the optional packages a run needs, and one forward pass of
    the model on a dummy input of the task's shape (m or k larger than the sequence, a bad ``--model-arg``).
    Raises ValueError or :class:`mita.deps.MissingDependency`."""
    config.validate()

    require("safetensors", purpose="mita train (it saves the weights as model.safetensors)")

    _check_model(config, get_preset(config.task, config.preset))


def _check_model(config: TrainConfig, preset: Preset) -> None:

    info = get_task(config.task)
    if config.task == "imagefolder":  # sized by the folder; scanning it reports bad images before any work
        info = folder_info_for(config.data_root, {**preset.data_kwargs, **config.data_kwargs})
    if info.kind == "segmentation":  # sized by the scene options; bad ones fail here, before any work
        scene_kw = {**preset.data_kwargs, **config.data_kwargs}
        info = scene_info(scene_config(*(scene_kw.get(k) for k in ("canvas", "items", "scale"))))
    seq_len = {**preset.data_kwargs, **config.data_kwargs}.get("seq_len")
    if seq_len is not None and info.seq_len is not None:
        info = dataclasses.replace(info, seq_len=seq_len)
    attn = {"num_landmarks": config.num_landmarks, "topk": config.topk, **causal_overrides(config)}
    builder, kwargs = model_spec(preset, info, config.attention, attn, config.model_kwargs)
    with torch.random.fork_rng(devices=[]):  # leave the run's random streams untouched
        try:
            model = build(builder, kwargs)
        except TypeError as err:
            raise ValueError(f"cannot build {builder} with these settings: {err}") from None
        if config.init_from and not config.resume:  # --init-from's shapes, before the run directory exists
            flags = {"resize_pos_embed": config.resize_pos_embed, "new_head": config.new_head}
            init_from(model, config.init_from, **flags)
        if info.kind in ("image", "segmentation"):
            x = torch.zeros(1, info.channels or 1, *info.image_size)
        elif info.seq_len is None:  # a task without a fixed length: nothing to try the model on
            return
        else:
            x = torch.ones(1, info.seq_len, dtype=torch.long)  # token 1: a real token in every vocabulary
            x = (x, x) if info.kind == "pair" else x
        with torch.no_grad():
            forward(model.eval(), x)


def main(argv: Sequence[str] | None = None) -> int:
    """``mita train``: returns 0 on success, 2 on bad input (with a one-line error on stderr)."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)

    try:
        preflight(config)
        summary = train(config)
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"mita train: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # 130 / 143 after SIGINT / SIGTERM (a checkpoint was saved)
    if summary.get("world_size", 1) == 1 or _is_rank0():
        print(format_summary(summary))
        print(f"summary: {config.out}/summary.json")
    return 0


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"
