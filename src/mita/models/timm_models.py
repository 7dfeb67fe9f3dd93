"""timm models with mita attention: ``build_timm(name, attention, **settings)``.

The model is ``timm.create_model(name, pretrained=False, ...)`` (nothing is downloaded; weights come from
``mita train --init-from``) with every attention swapped by :func:`mita.convert` (``full`` too, so all
kinds run the same shell). Training records the builder as ``timm:<name>`` (:data:`PREFIX`), so
``mita eval`` and ``--resume`` rebuild it the same way; the presets for timm names are in
:mod:`mita.train.presets`. timm is optional: it is imported when a timm model is asked for.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

from torch import nn

from ..convert import convert
from ..integrations.torchvision_shim import import_timm  # works around a CUDA torchvision on CPU
from ..nn.registry import attention_class
from .vit import VIT_PRESETS

__all__ = [
    "PREFIX", "TIMM_ATTENTION", "TIMM_SETTINGS", "build_timm", "check_timm_settings", "image_kwargs",
    "is_timm_model",
]  # fmt: skip

PREFIX = "timm:"
#: MiTA / Agent / top-k settings for timm's 14x14 patch grids (224 px, patch 16), as the vit-fmnist preset
TIMM_ATTENTION = {
    "mita": {"num_landmarks": 25, "topk": 25}, "agent": {"num_landmarks": 49}, "topk": {"topk": 50},
}  # fmt: skip

#: The timm settings a mita run may record and pass to ``timm.create_model``: sizes, rates and kinds.
#: Anything else (``checkpoint_path``, ``pretrained_cfg``, ``cache_dir``, layer classes, ...) could make
#: timm read a file or the network, so a checkpoint's metadata cannot set it.
TIMM_SETTINGS = frozenset(
    {
        "num_classes", "img_size", "in_chans", "patch_size", "embed_dim", "embed_dims", "depth", "depths",
        "num_heads", "mlp_ratio", "mlp_ratios", "qkv_bias", "qk_norm", "qk_scale", "class_token",
        "reg_tokens", "no_embed_class", "global_pool", "drop_rate", "drop_path_rate", "attn_drop_rate",
        "proj_drop_rate", "pos_drop_rate", "patch_drop_rate", "init_values", "dynamic_img_size",
        "dynamic_img_pad", "pre_norm", "fc_norm", "final_norm", "window_size", "num_prefix_tokens",
    }
)  # fmt: skip
_WORD = re.compile(r"[A-Za-z0-9_]{0,64}")


def _plain(value: Any) -> bool:
    """A number, bool, None, a short word, or a flat list of those."""
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(not isinstance(v, (list, tuple)) and _plain(v) for v in value)
    if isinstance(value, str):
        return _WORD.fullmatch(value) is not None
    return value is None or isinstance(value, (bool, int, float))


def check_timm_settings(name: Any, settings: dict[str, Any], attention_keys: set[str]) -> None:
    """ValueError unless ``name`` is a timm model name (no hub or local path) and every setting is one of
    :data:`TIMM_SETTINGS` or of the attention's keywords, with a plain value (see :func:`_plain`)."""
    timm = _timm()
    if not isinstance(name, str) or ":" in name or "/" in name or not timm.is_model(name):
        raise ValueError(f"{name!r} is not a timm model name (hub and local paths are not accepted)")
    for key, value in settings.items():
        if key not in TIMM_SETTINGS and key not in attention_keys:
            raise ValueError(
                f"timm setting {key!r} is not one mita passes to timm (sizes, rates and kinds only: "
                f"{', '.join(sorted(TIMM_SETTINGS))})"
            )
        if not _plain(value):
            raise ValueError(f"timm setting {key}={value!r} must be a number, bool or plain word")


def _timm():
    try:
        return import_timm()
    except RuntimeError as err:  # any other broken install
        first = str(err).strip().splitlines()[0]
        raise ImportError(f"timm is installed but does not import ({first})") from err


def is_timm_model(name: Any) -> bool:
    """True when timm is installed and knows model ``name`` (False without timm: it is optional)."""
    if not isinstance(name, str) or importlib.util.find_spec("timm") is None:
        return False
    return bool(_timm().is_model(name))


def build_timm(name: str, attention: str = "mita", **kw: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` with ``kw`` split between timm (model settings) and
    the attention (what :func:`mita.convert`'s kind accepts), then converted to ``attention``.

    Only timm model names and the settings :func:`check_timm_settings` allows are accepted (ValueError
    otherwise): a checkpoint's metadata must not make timm load a file or reach the network."""
    timm = _timm()
    accepted = attention_class(attention).accepted_kwargs() - {"dim", "num_heads", "norm_layer"}
    check_timm_settings(name, kw, accepted)
    attn_kw = {k: kw.pop(k) for k in list(kw) if k in accepted}
    model = timm.create_model(name, pretrained=False, **kw)
    model = convert(model, attention, **attn_kw)
    model.config = {"name": PREFIX + name, "attention": attention, **kw, **attn_kw}
    return model


def image_kwargs(builder: str, info: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``img_size`` / ``in_chans`` of the task for a ViT builder, where they differ from the builder's
    defaults (always for timm models), so existing runs keep their stored model settings."""
    if info.image_size is None:
        return {}
    size, chans = int(info.image_size[0]), int(info.channels or 3)
    if builder.startswith(PREFIX):
        return {"img_size": kwargs.get("img_size", size), "in_chans": kwargs.get("in_chans", chans)}
    base = {**VIT_PRESETS.get(builder, {}), **kwargs}
    out = {}
    if base.get("img_size") != size:
        out["img_size"] = size
    if base.get("in_chans") != chans:
        out["in_chans"] = chans
    return out
