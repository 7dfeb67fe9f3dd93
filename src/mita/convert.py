"""``mita.convert``: swap the attention of any module tree (timm ``Attention`` or our modules) in place.

Weights are copied by name (``qkv``, ``proj``, ``q_norm``, ``k_norm``, ``norm``, ``dwc`` and, between
kinds that have them, landmark parameters), so a timm ViT keeps its state-dict names and a checkpoint
trained with one attention can be evaluated with another (SPEC §3 checkpoint swap) or with other m, k.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import torch
from torch import nn

from .nn.base import AttentionBase
from .nn.registry import attention_class, check_kwargs, filter_kwargs

# Settings that describe the weights; the rest (m, k, landmarks, ...) may be changed freely.
_NO_ATTN_DROP = ("mita", "linear")


#: Where timm defines (or re-exports) its ViT ``Attention``, across timm versions.
_TIMM_ATTENTION_HOMES = ("timm.layers.attention", "timm.layers", "timm.models.vision_transformer")


def _timm_attention_classes() -> tuple[type, ...]:
    """timm's ViT ``Attention`` class(es), from timm's modules if timm is imported (no import here: a
    model holding timm modules has imported timm already)."""
    found = []
    for home in _TIMM_ATTENTION_HOMES:
        cls = getattr(sys.modules.get(home), "Attention", None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def is_timm_attention(module: nn.Module) -> bool:
    """True for timm's ViT ``Attention`` itself: its exact class, not another timm class that is merely
    named ``Attention`` (beit, levit, nest, samvit, volo, ... have their own, with other weights)."""
    return type(module) in _timm_attention_classes()


def _norm_layer(norm: nn.Module) -> Any:
    """A constructor reproducing ``norm`` (its class, with its ``eps`` when it has one)."""
    eps = getattr(norm, "eps", None)
    return functools.partial(type(norm), eps=eps) if eps is not None else type(norm)


def _timm_settings(mod: nn.Module) -> dict[str, Any]:
    dim = mod.qkv.in_features
    if getattr(mod, "gate", None) is not None:
        raise ValueError("timm Attention with gated=True has no equivalent here; convert without the gate")
    if mod.qkv.out_features != 3 * dim or mod.proj.out_features != dim or mod.num_heads * mod.head_dim != dim:
        raise ValueError(
            f"timm Attention with qkv {mod.qkv.out_features}, proj {mod.proj.out_features}, "
            f"{mod.num_heads} heads x {mod.head_dim} does not map onto dim={dim}"
        )
    qk_norm = not isinstance(mod.q_norm, nn.Identity)
    scale_norm = not isinstance(mod.norm, nn.Identity)
    out: dict[str, Any] = {
        "dim": dim,
        "num_heads": mod.num_heads,
        "qkv_bias": mod.qkv.bias is not None,
        "proj_bias": mod.proj.bias is not None,
        "qk_norm": qk_norm,
        "scale_norm": scale_norm,
        "attn_drop": mod.attn_drop.p,
        "proj_drop": mod.proj_drop.p,
    }
    if qk_norm or scale_norm:
        out["norm_layer"] = _norm_layer(mod.q_norm if qk_norm else mod.norm)
    return out


def _own_settings(mod: AttentionBase) -> dict[str, Any]:
    out = dict(mod.config)
    out.update(
        dim=mod.dim,
        num_heads=mod.num_heads,
        qkv_bias=mod.qkv.bias is not None,
        proj_bias=mod.proj.bias is not None,
        qk_norm=not isinstance(mod.q_norm, nn.Identity),
        scale_norm=not isinstance(mod.norm, nn.Identity),
        proj_drop=mod.proj_drop.p,
        layout=mod.layout,
        grid=mod.grid,
        prefix_tokens=mod.prefix_tokens,
        dwc=mod.dwc is not None,
        gate=mod.use_gate,
        rope=mod.rope_theta,
        num_kv_heads=mod.num_kv_heads,
    )
    if out["qk_norm"] or out["scale_norm"]:
        out["norm_layer"] = _norm_layer(mod.q_norm if out["qk_norm"] else mod.norm)
    out.setdefault("attn_drop", mod.attn_drop.p)
    return out


def _model_layout(model: nn.Module) -> dict[str, Any]:
    """Grid and prefix tokens of a ViT-like model (timm's or ours), to default the layout of new modules.

    A timm model built with ``dynamic_img_size=True`` has no fixed grid: the grid is left out here and
    :func:`_track_input_grid` gives it to the modules on every forward. A model with prefix tokens but no
    patch grid (timm's NaFlexVit, whose padded sequences hold images of any shape) gets ``"seq"``.
    """
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        return {}
    if grid is None:  # prefix tokens but no fixed grid (timm's NaFlexVit packs patches of any image size)
        return {"layout": "seq", "prefix_tokens": int(prefix)}
    if getattr(model, "dynamic_img_size", False):
        return {"layout": "grid", "grid": None, "prefix_tokens": int(prefix)}
    return {"layout": "grid", "grid": tuple(int(g) for g in grid), "prefix_tokens": int(prefix)}


def _patch_grid(patch_embed: nn.Module, inputs: tuple, output: Any) -> tuple[int, int]:
    """The patch grid of one forward of a timm patch embedding: from its NHWC output, else from the image."""
    if isinstance(output, torch.Tensor) and output.dim() == 4:  # dynamic timm ViTs embed to NHWC
        return int(output.shape[1]), int(output.shape[2])
    feat_size = getattr(patch_embed, "dynamic_feat_size", None)
    if feat_size is None or not inputs or not isinstance(inputs[0], torch.Tensor):
        raise ValueError(f"cannot tell the patch grid of {type(patch_embed).__name__}; pass layout='seq'")
    h, w = feat_size(tuple(inputs[0].shape[-2:]))
    return int(h), int(w)


class _InputGridHook:
    """Forward hook on a patch embedding: gives every attention module of ``model`` the input's grid.

    An object rather than a closure so that ``copy.deepcopy(model)`` copies it along with the model (its
    ``model`` then refers to the copy).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, patch_embed: nn.Module, inputs: tuple, output: Any) -> None:
        grid = _patch_grid(patch_embed, inputs, output)
        for sub in self.model.modules():
            if isinstance(sub, AttentionBase):
                sub.input_grid = grid


def _track_input_grid(model: nn.Module) -> None:
    """Give the attention modules of a dynamic-size timm model the patch grid of each input.

    timm's dynamic ViTs resample their position embedding per input but do not tell the attention the grid;
    a forward hook on the patch embedding records it in each module's ``input_grid`` before the blocks run.
    """
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        raise ValueError(
            f"{type(model).__name__} has dynamic_img_size=True but no patch_embed to read the grid"
        )
    if not any(isinstance(h, _InputGridHook) for h in pe._forward_hooks.values()):
        pe.register_forward_hook(_InputGridHook(model))


def convert_module(
    module: nn.Module, kind: str = "mita", defaults: dict | None = None, **kw: Any
) -> AttentionBase:
    """One attention module -> a new module of ``kind`` with the same weights (device, dtype, mode kept).

    Settings: the source's own (weights-defining ones always), then ``defaults``, then ``kw``.
    """
    if is_timm_attention(module):
        settings = {**(defaults or {}), **_timm_settings(module)}
    elif isinstance(module, AttentionBase):
        settings = {**(defaults or {}), **_own_settings(module)}
    else:
        raise ValueError(
            f"cannot convert {type(module).__name__}: not a timm Attention nor a mita attention module"
        )
    if kind in _NO_ATTN_DROP and "attn_drop" not in kw:
        dropped = settings.pop("attn_drop", None)  # that kind has no attention dropout to carry it to
        if dropped:
            warnings.warn(
                f"convert: {kind!r} has no attention dropout; the source's attn_drop={dropped} is dropped "
                "(the output dropout proj_drop is kept)",
                UserWarning,
                stacklevel=3,
            )
    check_kwargs("attention", kind, kw, attention_class(kind).accepted_kwargs())  # the source's are filtered
    cfg = filter_kwargs(kind, {**settings, **kw})
    ref = module.qkv.weight
    new = attention_class(kind)(**cfg).to(device=ref.device, dtype=ref.dtype)
    _copy_weights(module, new)
    return new.train(module.training)


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every tensor ``dst`` shares with ``src`` by name and shape; qkv and proj must match."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for name in ("qkv.weight", "proj.weight"):
        if src_sd[name].shape != dst_sd[name].shape:
            raise ValueError(f"{name}: source {tuple(src_sd[name].shape)} vs new {tuple(dst_sd[name].shape)}")
    shared = {k: v for k, v in src_sd.items() if k in dst_sd and dst_sd[k].shape == v.shape}
    skipped = sorted(k for k in src_sd if k in dst_sd and k not in shared)
    if skipped:  # e.g. learned landmarks when m changes: the new module keeps its fresh initialisation
        warnings.warn(f"convert: shapes differ, not copied: {skipped}", stacklevel=3)
    dst.load_state_dict(shared, strict=False)


def convert(model: nn.Module, kind: str = "mita", **kw: Any) -> nn.Module:
    """Replace every timm ``Attention`` and every mita attention module in ``model`` with ``kind``.

    ``kw`` are constructor settings of the new kind (e.g. ``num_landmarks=36, topk=36``); settings the
    kind does not take raise ValueError. Unless given, the layout (grid and prefix tokens) comes from the
    model's ``patch_embed.grid_size`` and ``num_prefix_tokens`` (timm ViTs and :mod:`mita.models`), and
    every other setting from the replaced module. Weights (qkv, proj, norms, dwc) are copied. The model is
    changed in place and returned; if ``model`` itself is an attention module, the new module is returned.

    A timm model built with ``dynamic_img_size=True`` gets the grid of every input from its patch
    embedding (a forward hook), so any image size pools landmarks over its own grid. A model with nothing
    to convert (no attention, or only attention classes mita cannot convert, such as timm's EVA/RoPE or
    Swin window attention) raises ValueError naming the classes found; unconvertible attention modules
    left beside converted ones are named in a warning.
    """
    attention_class(kind)  # fail early on an unknown kind
    defaults = _model_layout(model)
    if is_timm_attention(model) or isinstance(model, AttentionBase):
        return convert_module(model, kind, defaults, **kw)
    found = attention_modules(model)
    others = _unconvertible(model)
    if not found:
        what = f"found only {others}, which mita cannot convert" if others else "found no attention module"
        raise ValueError(
            f"convert: nothing to convert in {type(model).__name__}: {what} (mita converts timm's ViT "
            "Attention and mita's attention modules)"
        )
    if others:
        warnings.warn(f"convert: left unconverted attention modules {others}", stacklevel=2)
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, convert_module(mod, kind, defaults, **kw))
    if getattr(model, "dynamic_img_size", False):
        _track_input_grid(model)
    return model


def _unconvertible(model: nn.Module) -> dict[str, int]:
    """Class names (with counts) of attention-like modules that are neither timm's ``Attention`` nor ours."""
    counts: dict[str, int] = {}
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if is_timm_attention(mod) or isinstance(mod, AttentionBase) or not name:
            continue
        if "attention" in cls.lower() or cls.lower().endswith("attn"):
            if cls == "Attention":  # another library's (or timm model's) own class: say whose
                cls = f"{type(mod).__module__}.{cls}"
            counts[cls] = counts.get(cls, 0) + 1
    return counts


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every convertible attention module in ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_timm_attention(m) or isinstance(m, AttentionBase)]
