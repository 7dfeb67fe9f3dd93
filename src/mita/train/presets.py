"""Model and optimisation presets per task, and building a model from a preset or a checkpoint's metadata.

A preset fixes the architecture (builder + sizes), the default attention settings per attention kind
and the training recipe (epochs or steps, batch size, learning rate...). Command-line flags override
any of them. Long-range presets follow the LRA set-up of Nystromformer/Skyformer, whose full-attention
numbers the MiTA paper reports (2 layers, width 64, 2 heads, MLP 128; m = k = 16 for MiTA, m = 32 for
Agent; SPEC §3): batch sizes and step counts below are theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

ATTENTIONS = ("mita", "full", "agent", "moba", "topk", "linear")


@dataclass(frozen=True)
class Preset:
    """Architecture and recipe. Exactly one of ``epochs`` / ``steps`` sets the default run length."""

    name: str
    builder: str  # "vit_fmnist" (mita.models.build_model name) or "sequence" (SequenceClassifier)
    model_kwargs: dict[str, Any]
    attention_kwargs: dict[str, dict[str, Any]]  # per attention kind, e.g. {"mita": {"topk": 16}}
    batch_size: int
    lr: float
    weight_decay: float
    epochs: int | None = None
    steps: int | None = None
    warmup_frac: float = 0.05
    clip: float = 1.0
    label_smoothing: float = 0.0
    description: str = ""
    tasks: tuple[str, ...] = field(default=())  # tasks it applies to; empty = all

    def applies_to(self, task: str) -> bool:
        return not self.tasks or task in self.tasks


_LRA_ATTN = {"mita": {"num_landmarks": 16, "topk": 16}, "agent": {"num_landmarks": 32}}
_LRA_MODEL = {"dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}

PRESETS: dict[str, Preset] = {
    "vit-fmnist": Preset(
        name="vit-fmnist",
        builder="vit_fmnist",
        model_kwargs={},
        attention_kwargs={"mita": {"num_landmarks": 25, "topk": 25}, "agent": {"num_landmarks": 25}},
        batch_size=128,
        lr=2e-3,
        weight_decay=0.05,
        epochs=3,
        warmup_frac=0.05,
        label_smoothing=0.1,
        description="ViT on 28x28 Fashion-MNIST, patch 2 -> 196 patches + cls = 197 tokens (DeiT-224 shape), "
        "m = k = 25 as the paper's DeiT",
        tasks=("fmnist",),
    ),
    "lra-listops": Preset(
        "lra-listops",
        "sequence",
        _LRA_MODEL,
        _LRA_ATTN,
        32,
        1e-4,
        0.0,
        steps=5000,
        warmup_frac=0.2,
        tasks=("listops",),
        description="LRA ListOps, 2K tokens",
    ),
    "lra-text": Preset(
        "lra-text",
        "sequence",
        _LRA_MODEL,
        _LRA_ATTN,
        32,
        1e-4,
        0.0,
        steps=20000,
        warmup_frac=0.4,
        tasks=("text",),
        description="LRA-style byte-level text, 4K bytes",
    ),
    "lra-retrieval": Preset(
        "lra-retrieval",
        "sequence",
        _LRA_MODEL,
        _LRA_ATTN,
        32,
        1e-4,
        0.0,
        steps=30000,
        warmup_frac=800 / 30000,
        tasks=("retrieval",),
        description="LRA-style byte-level retrieval, 2 x 4K bytes",
    ),
    "lra-image": Preset(
        "lra-image",
        "sequence",
        _LRA_MODEL,
        _LRA_ATTN,
        256,
        1e-4,
        0.0,
        steps=35000,
        warmup_frac=175 / 35000,
        tasks=("image",),
        description="pixel sequences, 1K tokens",
    ),
    "lra-pathfinder": Preset(
        "lra-pathfinder",
        "sequence",
        _LRA_MODEL,
        _LRA_ATTN,
        256,
        1e-4,
        0.0,
        steps=62400,
        warmup_frac=312 / 62400,
        tasks=("pathfinder",),
        description="Pathfinder-32, 1K pixels",
    ),
    "tiny": Preset(
        name="tiny",
        builder="auto",
        model_kwargs={"dim": 16, "depth": 1, "num_heads": 2},
        attention_kwargs={"mita": {"num_landmarks": 4, "topk": 4}, "agent": {"num_landmarks": 4}},
        batch_size=8,
        lr=1e-3,
        weight_decay=0.0,
        steps=20,
        warmup_frac=0.1,
        description="smoke-test model for any task (CI)",
    ),
}

DEFAULT_PRESET = {
    "fmnist": "vit-fmnist",
    "listops": "lra-listops",
    "text": "lra-text",
    "retrieval": "lra-retrieval",
    "image": "lra-image",
    "pathfinder": "lra-pathfinder",
}


def get_preset(task: str, name: str | None = None) -> Preset:
    """The preset ``name`` (default: the task's), checked to apply to ``task``."""
    name = name or DEFAULT_PRESET.get(task)
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if not preset.applies_to(task):
        raise ValueError(f"preset {name!r} is for task(s) {', '.join(preset.tasks)}, not {task!r}")
    return preset


def model_spec(
    preset: Preset,
    info: Any,
    attention: str,
    attention_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(builder, kwargs)`` fully describing the model: stored in checkpoints to rebuild it."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; valid kinds: {', '.join(ATTENTIONS)}")
    kwargs = {**preset.model_kwargs, **(model_overrides or {})}
    kwargs.update(preset.attention_kwargs.get(attention, {}))
    kwargs.update({k: v for k, v in (attention_overrides or {}).items() if v is not None})
    kwargs["attention"] = attention
    builder = preset.builder
    if builder == "auto":
        builder = "vit_fmnist" if info.kind == "image" else "sequence"
    if builder == "sequence":
        if info.kind not in ("sequence", "pair"):
            raise ValueError(
                f"preset {preset.name!r} builds a sequence model but task {info.name!r} is {info.kind}"
            )
        kwargs.update(
            vocab_size=info.vocab_size,
            num_classes=info.num_classes,
            max_len=info.seq_len,
            pair=info.kind == "pair",
        )
    else:
        if info.kind != "image":
            raise ValueError(f"preset {preset.name!r} builds a ViT but task {info.name!r} is {info.kind}")
        kwargs["num_classes"] = info.num_classes
    return builder, kwargs


def build(builder: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate ``builder`` (``"sequence"`` or a :func:`mita.models.build_model` name) with ``kwargs``."""
    import mita.models as models

    if builder == "sequence":
        return models.SequenceClassifier(**kwargs)
    return models.build_model(builder, **kwargs)


def build_model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The model described by a checkpoint's metadata (``model`` and ``model_kwargs``)."""
    return build(meta["model"], dict(meta["model_kwargs"]))
