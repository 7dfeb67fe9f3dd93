"""``mita.convert``: swap the attention of any module tree (timm ``Attention`` or our modules) in place.

Weights are copied by name (``qkv``, ``proj``, ``q_norm``, ``k_norm``, ``norm``, ``dwc`` and, between
kinds that have them, landmark parameters), so a timm ViT keeps its state-dict names and a checkpoint
trained with one attention can be evaluated with another (SPEC §3 checkpoint swap) or with other m, k.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn

from .nn.base import AttentionBase
from .nn.registry import attention_class, filter_kwargs

# Settings that describe the weights; the rest (m, k, landmarks, ...) may be changed freely.
_NO_ATTN_DROP = ("mita", "linear")


def is_timm_attention(module: nn.Module) -> bool:
    """True for timm's ViT ``Attention`` (detected by module path, so timm need not be imported)."""
    cls = type(module)
    return cls.__name__ == "Attention" and cls.__module__.startswith("timm.") and hasattr(module, "qkv")


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
    """Grid and prefix tokens of a ViT-like model (timm's or ours), to default the layout of new modules."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if grid is None or prefix is None:
        return {}
    return {"layout": "grid", "grid": tuple(int(g) for g in grid), "prefix_tokens": int(prefix)}


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
        settings.pop("attn_drop", None)  # that kind has no attention dropout to carry it to
    cfg = filter_kwargs(kind, {**settings, **kw})
    unknown = set(kw) - attention_class(kind).accepted_kwargs()
    if unknown:
        raise ValueError(f"attention kind {kind!r} does not take {sorted(unknown)}")
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
    """
    attention_class(kind)  # fail early on an unknown kind
    defaults = _model_layout(model)
    if is_timm_attention(model) or isinstance(model, AttentionBase):
        return convert_module(model, kind, defaults, **kw)
    for name, mod in attention_modules(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, convert_module(mod, kind, defaults, **kw))
    return model


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every convertible attention module in ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_timm_attention(m) or isinstance(m, AttentionBase)]
