"""The settings of one training run (what ``mita train`` flags fill in), checked before a run starts."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from mita.data import build_dataset, get_task
from mita.system import resolve_device

from .curriculum import check_stages, parse_curriculum
from .init_from import check_config
from .presets import attention_kinds, get_preset

__all__ = ["TrainConfig", "resume_differences"]

_POSITIVE_INTS = (
    "num_landmarks", "topk", "block_size", "epochs", "max_steps", "batch_size", "train_size", "test_size",
    "eval_every", "save_every", "log_every", "eval_batch_size", "context_parallel", "full_first",
)  # fmt: skip
# model keywords that are sizes: zero or negative builds a model with nothing in it, or none at all
_POSITIVE_MODEL_ARGS = (
    "dim", "embed_dim", "depth", "num_heads", "num_kv_heads", "mlp_ratio", "patch_size", "num_landmarks",
    "topk", "experts_per_query", "window",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` means "the preset's value".

    ``max_steps`` caps the run (the schedule then spans the shorter of the two lengths);
    ``eval_every``/``save_every`` are in optimizer steps (``None``: once per epoch, and at the end).
    """

    task: str
    attention: str = "mita"
    preset: str | None = None
    num_landmarks: int | None = None
    topk: int | None = None
    block_size: int | None = None  # causal kinds of the GPT: landmark / own block size
    landmark_horizon: str | None = None  # causal MiTA: "prefix" or "frozen"
    curriculum: str | None = None  # MQAR: LEN:PAIRS:STEPS[:BATCH],... before the task (mita.train.curriculum)
    full_first: int | None = None  # GPT causal kinds: full attention for the first N steps (train.full_first)
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_frac: float | None = None
    clip: float | None = None
    seed: int = 0
    out: str = "runs/run"
    resume: bool = False
    device: str = "auto"
    amp: bool = False
    data_root: str | None = None
    cache_dir: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 50
    eval_batch_size: int = 256
    num_workers: int = 0
    progress: bool = True
    # start from other weights, any attention kind (mita.train.init_from)
    init_from: str | None = None
    attn_only: bool = False
    resize_pos_embed: bool = False
    new_head: bool = False
    # ranks per sequence (mita.distributed): consecutive torchrun ranks split each sequence; 1 = off
    context_parallel: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Check every setting that needs no data: names against their registries, numbers in range, the
        device, the data and model keywords. Raises ValueError naming the flag; creates nothing, so it
        runs before the run directory exists."""

        get_task(self.task)

        check_config(self)
        kinds = attention_kinds(get_preset(self.task, self.preset).builder)
        if self.attention not in kinds:
            raise ValueError(f"unknown attention {self.attention!r}; valid kinds: {', '.join(kinds)}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        for name, value, ok, rule in (
            ("lr", self.lr, lambda v: v > 0, "> 0"),
            ("weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0"),
            ("warmup_frac", self.warmup_frac, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("clip", self.clip, lambda v: v >= 0, ">= 0 (0 = off)"),
        ):
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and ok(value)
            ):
                raise ValueError(f"--{_flag(name)} must be a finite number {rule}, got {value!r}")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.num_workers!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")
        resolve_device(self.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.context_parallel > 1 and world % self.context_parallel:
            raise ValueError(
                f"--context-parallel {self.context_parallel} needs torchrun with a multiple of "
                f"{self.context_parallel} processes, got {world}"
            )
        if self.landmark_horizon is not None and self.landmark_horizon not in ("prefix", "frozen"):
            raise ValueError(f"--landmark-horizon must be prefix or frozen, got {self.landmark_horizon!r}")

        preset_data = get_preset(self.task, self.preset).data_kwargs
        check_stages(parse_curriculum(self.curriculum), self.task, {**preset_data, **self.data_kwargs})
        accepted = set(inspect.signature(build_dataset).parameters) - {"name", "split"}
        unknown = sorted(set(self.data_kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"--data-arg {', '.join(unknown)}: not a data option; valid: {', '.join(sorted(accepted))}"
            )
        for key in ("seq_len", "size", "seed", "num_pairs", "vocab_size", "img_size"):
            value = self.data_kwargs.get(key)
            if value is not None and not _is_int(value):
                raise ValueError(f"--data-arg {key}={value!r}: must be an integer")
        if "augment" in self.data_kwargs and not isinstance(self.data_kwargs["augment"], bool):
            raise ValueError(f"--data-arg augment={self.data_kwargs['augment']!r}: must be true or false")
        for key in _POSITIVE_MODEL_ARGS:
            value = self.model_kwargs.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            ):
                raise ValueError(f"--model-arg {key}={value!r}: must be a positive number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(name: str) -> str:
    flags = {"warmup_frac": "warmup", "num_workers": "workers", "data_kwargs": "data-arg"}
    return flags.get(name, {"model_kwargs": "model-arg"}.get(name, name.replace("_", "-")))


#: Settings a resumed run may change: where it runs and what it reports, not what it computes.
RESUMABLE = frozenset(
    {
        "out", "resume", "device", "progress", "log_every", "eval_every", "save_every", "eval_batch_size",
        "num_workers", "data_root", "cache_dir", "init_from", "resize_pos_embed", "new_head",
    }
)  # fmt: skip


def resume_differences(saved: dict[str, Any], config: TrainConfig) -> str | None:
    """None when ``config`` may resume the run whose settings were ``saved`` (its ``to_dict()``), else the
    one-line reason naming each flag that differs. Settings the saved run does not record are not compared."""
    now = config.to_dict()
    changed = [
        f"--{_flag(key)} (was {saved[key]!r}, now {now[key]!r})"
        for key in sorted(now)
        if key not in RESUMABLE and key in saved and saved[key] != now[key]
    ]
    if not changed:
        return None
    return (
        f"cannot resume with other settings: {', '.join(changed)}; the run's recipe, data and model stay as "
        "trained: use the original settings or another --out"
    )
