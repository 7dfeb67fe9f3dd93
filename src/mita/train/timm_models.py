"""timm model names as presets: ``mita train --preset vit_tiny_patch16_224 --attention mita ...``.

The model is ``timm.create_model(name, pretrained=False, ...)`` (nothing is downloaded; weights come from
``--init-from``) sized for the task (classes, image size, channels), with every attention swapped by
:func:`mita.convert` (``full`` too, so all kinds run the same shell). Checkpoints record the builder as
``timm:<name>``, so ``mita eval`` and ``--resume`` rebuild it the same way. timm is optional; a name
that is not a mita preset is looked up here only when timm is installed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

__all__ = ["PREFIX", "build_timm", "image_kwargs", "timm_preset"]

PREFIX = "timm:"
# MiTA / Agent settings for timm's 14x14 patch grids (224 px, patch 16), as the vit-fmnist preset
_ATTN = {"mita": {"num_landmarks": 25, "topk": 25}, "agent": {"num_landmarks": 49}, "topk": {"topk": 50}}


def _timm():
    from ..integrations.torchvision_shim import import_timm  # works around a CUDA torchvision on CPU

    try:
        return import_timm()
    except RuntimeError as err:  # any other broken install
        first = str(err).strip().splitlines()[0]
        raise ImportError(f"timm is installed but does not import ({first})") from err


def timm_preset(name: str):
    """A :class:`~mita.train.presets.Preset` for timm model ``name``, or None when timm is not installed
    or does not know the name."""
    if not isinstance(name, str) or importlib.util.find_spec("timm") is None:
        return None
    timm = _timm()
    if not timm.is_model(name):
        return None
    from .presets import Preset

    return Preset(
        name=name, builder=PREFIX + name, model_kwargs={}, attention_kwargs=_ATTN, batch_size=64, lr=5e-4,
        weight_decay=0.05, epochs=10, warmup_frac=0.05,
        description=f"timm's {name} (not downloaded: use --init-from), attention swapped by mita.convert",
    )  # fmt: skip


def build_timm(name: str, attention: str = "mita", **kw: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` with ``kw`` split between timm (model settings) and
    the attention (what :func:`mita.convert`'s kind accepts), then converted to ``attention``."""
    from ..convert import convert
    from ..nn.registry import attention_class

    timm = _timm()
    accepted = attention_class(attention).accepted_kwargs()
    attn_kw = {k: kw.pop(k) for k in list(kw) if k in accepted and k not in ("dim", "num_heads")}
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
    from ..models.vit import VIT_PRESETS

    base = {**VIT_PRESETS.get(builder, {}), **kwargs}
    out = {}
    if base.get("img_size") != size:
        out["img_size"] = size
    if base.get("in_chans") != chans:
        out["in_chans"] = chans
    return out
