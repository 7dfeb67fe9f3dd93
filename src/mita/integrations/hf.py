"""Hugging Face transformers integration: MiTA as an ``attn_implementation`` for non-causal encoders.

``register()`` adds an attention function to transformers' ``AttentionInterface`` and a matching mask
function to ``AttentionMaskInterface`` (without it the padding mask would arrive as None and padding would
be silently attended). Then ``Model.from_config(config, attn_implementation="mita")`` or
``model.set_attn_implementation("mita")`` routes every self-attention through :func:`mita.mita_attention`.
Needs ``pip install transformers`` (the ``hf`` extra). On a CPU machine with PyPI's CUDA-only torchvision
installed, call :func:`mita.integrations.torchvision_shim.install` before importing transformers yourself
(``register()`` does it before its own import).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..nn.landmark_modes import LandmarkBuilder, landmark_mode_arg
from ..nn.layout import check_layout, resolve_layout
from ..nn.mita import mita_mix
from ..ops.api import BACKENDS
from ..ops.arguments import as_experts, as_int, as_scale
from .torchvision_shim import install as install_torchvision_shim


def _require_transformers() -> Any:
    install_torchvision_shim()  # PyPI's CUDA-only torchvision would break the import on a CPU machine
    try:
        import transformers  # noqa: PLC0415 - optional
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "mita.integrations.hf needs transformers: pip install transformers (the 'hf' extra)"
        ) from err
    return transformers


def padding_mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: passes the 2-D padding mask ``[B, kv_length]`` (True =
    real token) through unchanged, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"MiTA expects a 2-D [B, N] padding mask, got shape {tuple(attention_mask.shape)}")
    attention_mask = attention_mask[:, -kv_length:].bool()
    return None if bool(attention_mask.all()) else attention_mask


def _grid_of(grid: tuple[int, int] | None, prefix: int, n: int) -> tuple[int, int] | None:
    """The patch grid of a forward of ``n`` tokens: ``grid`` when it fits, else the grid of the same
    aspect ratio holding the ``n - prefix`` body tokens (an HF ViT called with
    ``interpolate_pos_encoding=True`` at another image size); ValueError when none fits."""
    if grid is None:
        return None  # square, inferred per call by resolve_layout
    h, w = grid
    body = n - prefix
    if body == h * w or body < 1:
        return grid
    if body * h % w == 0:  # h' / w' = h / w and h' w' = body: h'^2 = body h / w
        rows = math.isqrt(body * h // w)
        if rows and body % rows == 0 and rows * w == (body // rows) * h:
            return rows, body // rows
    raise ValueError(
        f"{n} tokens with prefix_tokens={prefix} fit neither grid={grid} nor a grid of its aspect ratio; "
        "register with the grid of this input size (or grid=None for square grids of any size)"
    )


def make_attention_function(
    *,
    num_landmarks: int | tuple[int, int] = 16,
    topk: int = 16,
    experts_per_query: int = 1,
    landmark_mode: str = "pool",
    layout: str = "seq",
    grid: tuple[int, int] | None = None,
    prefix_tokens: int = 0,
    shared: bool = True,
    routed: bool = True,
    landmark_scale: float | None = None,
    backend: str = "auto",
    landmarks: str | None = None,
) -> Callable:
    """Build the ``AttentionInterface`` function with fixed MiTA settings (all checked here).

    ``landmark_mode`` may be ``"pool"`` or ``"official"`` (the parameter-free modes; ``landmarks=`` is its
    deprecated old name); ``layout``/``grid``/``prefix_tokens`` describe the tokens as in
    :class:`mita.nn.MiTAAttention` (e.g. HF ViT: ``"grid"``, prefix 1). On a sequence shorter than the
    settings, ``topk`` is clipped to its length and, in the ``"seq"`` layout, ``num_landmarks`` to its
    pooled tokens (and ``experts_per_query`` to that m). The mixing is :func:`mita.nn.mita.mita_mix`, the
    code of :meth:`mita.nn.MiTAAttention.attend`.

    A ``grid`` is the patch grid at the configured image size; at another size (HF ViT with
    ``interpolate_pos_encoding=True``) the grid of the same aspect ratio is inferred per call. MiTA has no
    attention dropout: the dropout transformers passes in training mode is not applied (a warning).
    """
    mode = landmark_mode_arg(landmark_mode, landmarks, "make_attention_function")
    if mode not in ("pool", "official"):
        raise ValueError(f"the HF integration supports landmark_mode 'pool' or 'official', got {mode!r}")
    grid = check_layout(layout, grid, prefix_tokens)
    topk = as_int("topk", topk)
    shared, routed = as_experts(shared, routed)
    landmark_scale = as_scale("landmark_scale", landmark_scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def builder(m: int | tuple[int, int]) -> LandmarkBuilder:
        # the parameter-free modes use neither the model width nor the head count
        return LandmarkBuilder(0, 0, m, mode, layout, grid)

    builders = {None: builder(num_landmarks)}  # None: the configured m; ints: clipped ones, made on demand
    m = builders[None].m
    experts_per_query = as_int("experts_per_query", experts_per_query, 1, m, what=f"m={m}")

    def mita_attention_function(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
            raise ValueError("MiTA attention is non-causal; use it in encoders (is_causal=False)")
        if dropout:  # transformers passes the config's attention dropout in training mode
            warnings.warn(
                f"MiTA has no attention dropout: the model's attention dropout ({dropout}) is not applied "
                "(set attention_probs_dropout_prob=0 to silence this)",
                UserWarning,
                stacklevel=2,
            )
        n = query.shape[2]
        pad = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
                raise ValueError(
                    "MiTA needs its mask function (register() installs it); got a "
                    f"{attention_mask.dtype} mask of shape {tuple(attention_mask.shape)}"
                )
            pad = ~attention_mask
        tl = resolve_layout(layout, _grid_of(grid, prefix_tokens, n), prefix_tokens, n)
        clipped = None if layout != "seq" or m <= tl.body else tl.body
        if clipped not in builders:
            builders[clipped] = builder(clipped)
        lm = builders[clipped]
        out = mita_mix(
            lm, query, key, value, pad, tl, topk=min(topk, key.shape[2]),
            experts_per_query=min(experts_per_query, lm.m), scale=scaling, landmark_scale=landmark_scale,
            shared=shared, routed=routed, backend=backend,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    return mita_attention_function


def register(name: str = "mita", **settings: Any) -> str:
    """Register MiTA with transformers under ``name`` (attention and mask functions); returns ``name``.

    ``settings`` go to :func:`make_attention_function` (``num_landmarks``, ``topk``, ``layout``, ...) and
    are checked before anything is registered (ValueError naming the setting).
    """
    fn = make_attention_function(**settings)
    tf = _require_transformers()
    tf.AttentionInterface.register(name, fn)
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415 - optional

    AttentionMaskInterface.register(name, padding_mask_function)
    return name
