"""The settings of one training run (what ``mita train`` flags fill in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` means "the preset's value".

    ``max_steps`` caps the run (the schedule then spans the shorter of the two lengths);
    ``eval_every``/``save_every`` are in optimizer steps (``None``: once per epoch, and at the end).
    """

    task: str
    attention: str = "mita"
    model: str | None = None
    num_landmarks: int | None = None
    topk: int | None = None
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
