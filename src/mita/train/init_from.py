"""``mita train --init-from PATH``: start a run from existing weights, with any attention kind.

``PATH`` is (a) a mita run directory or ``.safetensors`` checkpoint trained with any attention kind, or
(b) a weights-only state dict with timm ViT key names: a ``.safetensors`` file, or a ``torch.save`` file
read with ``torch.load(weights_only=True)`` (never unpickled otherwise). The model to fill is the one the
run built (its ``--preset`` and ``--attention``); weights are matched by name, which carries the shared
ones (patch embedding, ``qkv``, ``proj``, norms, MLPs, head) from any attention kind to any other, since
every kind keeps timm's parameter names. Parameters only the new kind has (DWC, learned or conv
landmarks) keep their fresh initialisation. Shapes that differ are refused with a clear error, except
the position embedding with ``resize_pos_embed`` (bicubic resampling of the patch grid, the class token
kept) and the classifier with ``new_head`` (re-created for a new number of classes).

``--attn-only`` (:func:`freeze_for_attn_only`) then trains only the attention modules, the head and the
position embedding, as the MiTA authors' fine-tuning script; everything else gets ``requires_grad=False``.

The optimizer and the schedule of such a run start anew; ``--resume`` of an existing run continues from
its own checkpoint and ignores ``--init-from`` (with a note).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import attention_modules
from ..integrations.torchvision_shim import import_timm
from .checkpoint import CheckpointError, read_meta, resolve_model_path, unwrap

__all__ = [
    "InitFromError",
    "InitReport",
    "apply",
    "freeze_for_attn_only",
    "init_from",
    "load_state_dict_file",
    "bicubic_resample",
    "resample_pos_embed",
]

# Parameters of the attention shell every kind shares (timm's names); anything else inside an attention
# module (``landmark.*``, ``dwc.*``) belongs to one kind and may be absent from a source of another kind.
_SHELL = ("qkv.", "proj.", "q_norm.", "k_norm.", "norm.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers in saved state dicts
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class InitFromError(ValueError):
    """``--init-from`` weights cannot be loaded into the model (missing file, bad format, other shapes)."""


@dataclass
class InitReport:
    """What :func:`init_from` did; stored in the run's metadata under ``init_from``."""

    path: str
    file: str
    source_meta: dict[str, Any] | None
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # model keys not in the file: kept fresh
    unexpected: list[str] = field(default_factory=list)  # file keys the model has no place for
    fresh: list[str] = field(default_factory=list)  # kind-specific attention parameters kept fresh
    resized: list[str] = field(default_factory=list)
    new_head: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        src = self.source_meta or {}
        return {
            "path": self.path,
            "file": self.file,
            "source": {k: src.get(k) for k in ("task", "attention", "preset", "model", "step") if k in src},
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "fresh": self.fresh,
            "resized": self.resized,
            "new_head": self.new_head,
        }

    def lines(self) -> list[str]:
        """Human-readable summary (printed to stderr at the start of the run)."""
        src = self.source_meta or {}
        what = (
            f"mita run: task {src.get('task')}, attention {src.get('attention')}, step {src.get('step')}"
            if src
            else "plain state dict"
        )
        out = [f"init-from {self.file} ({what}): {self.loaded} tensors loaded"]
        for label, keys in (
            ("missing keys (kept at their fresh initialisation)", self.missing),
            ("unexpected keys (ignored)", self.unexpected),
            ("kind-specific attention tensors of other shapes (kept fresh)", self.fresh),
            ("resized", self.resized),
            ("head re-created", self.new_head),
        ):
            if keys:
                out.append(f"  {label}: {len(keys)}: {_short(keys)}")
        return out


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# ---- reading a source -------------------------------------------------------------------------------


def load_state_dict_file(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """``(state_dict, mita_meta or None, file)`` of a run directory, a safetensors file or a torch file.

    torch files are read with ``torch.load(weights_only=True)`` only: a pickle that needs anything but
    tensors and plain containers is refused. A file holding ``{"state_dict": sd}`` or ``{"model": sd}``
    (common checkpoint layouts) is unwrapped; ``module.`` / ``_orig_mod.`` prefixes are stripped.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InitFromError(f"--init-from: {p} does not exist")
    if p.is_dir():
        try:
            p = resolve_model_path(p)
        except CheckpointError as err:
            raise InitFromError(f"--init-from: {err}") from err
    if p.suffix == ".safetensors":
        state, meta = _read_safetensors(p)
    elif p.suffix in _TORCH_SUFFIXES:
        state, meta = _read_torch(p), None
    else:
        raise InitFromError(
            f"--init-from: {p}: unknown weights format (expected a run directory, .safetensors or one of "
            f"{', '.join(_TORCH_SUFFIXES)})"
        )
    return _strip_prefixes(state), meta, p


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    try:
        from safetensors.torch import load_file  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("--init-from with a .safetensors file needs: pip install safetensors") from err
    try:
        state = load_file(str(p), device="cpu")
    except Exception as err:  # safetensors raises its own types for truncated / garbled files
        raise InitFromError(f"--init-from: {p} is not a readable safetensors file ({err})") from err
    try:
        meta = read_meta(p)
    except CheckpointError:
        meta = None  # a plain safetensors state dict (e.g. exported from timm), no mita metadata
    return state, meta


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but tensors; zip / EOF errors for other files
        # torch's own message suggests turning the weights-only check off; say only why it was refused
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        first = f"it needs the Python object {found.group(1)}" if found else type(err).__name__
        raise InitFromError(
            f"--init-from: {p} cannot be read as a weights-only torch file ({first}); only state dicts of "
            "tensors are accepted (a mita training-state .pt is not weights: pass the run directory)"
        ) from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise InitFromError(f"--init-from: {p} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


# ---- position embeddings ------------------------------------------------------------------------------


def resample_pos_embed(
    pos: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """``pos`` ``[1, prefix + h*w, D]`` (square source grid) -> ``[1, prefix + H*W, D]`` for ``new_grid``.

    Bicubic interpolation of the grid part (antialiased when shrinking), prefix (class) tokens kept: the
    same as timm's ``resample_abs_pos_embed``, which is used when timm imports.
    """
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise InitFromError(f"pos_embed must be [1, N, D], got {tuple(pos.shape)}")
    n_grid = pos.shape[1] - num_prefix_tokens
    side = math.isqrt(max(n_grid, 0))
    if n_grid <= 0 or side * side != n_grid:
        raise InitFromError(
            f"pos_embed with {pos.shape[1]} positions and {num_prefix_tokens} prefix token(s) is not a "
            "square patch grid; cannot resample it"
        )
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    timm_fn = _timm_resample()
    if timm_fn is not None:
        return timm_fn(pos, list(new_grid), num_prefix_tokens=num_prefix_tokens)
    return bicubic_resample(pos, new_grid, num_prefix_tokens)


def bicubic_resample(
    pos: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """The resampling of :func:`resample_pos_embed` without timm (bicubic, antialiased, corners unaligned)."""
    side = math.isqrt(pos.shape[1] - num_prefix_tokens)
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    dtype = grid.dtype
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(dtype)
    return torch.cat([prefix, grid], dim=1)


def _timm_resample() -> Callable | None:
    """timm's ``resample_abs_pos_embed`` when timm is installed and imports."""
    if importlib.util.find_spec("timm") is None:
        return None

    try:
        return import_timm().layers.resample_abs_pos_embed
    except (ImportError, RuntimeError, AttributeError):  # a broken install: our own resampling
        return None


def _grid_of(model: nn.Module) -> tuple[int, int] | None:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


# ---- matching a state dict to a model ---------------------------------------------------------------------


def _attention_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, _ in attention_modules(model)]


def _kind_specific(key: str, attn_prefixes: list[str]) -> bool:
    """A parameter inside an attention module that is not part of the shared timm shell."""
    for prefix in attn_prefixes:
        if key.startswith(prefix):
            return not key[len(prefix) :].startswith(_SHELL)
    return False


def _head_keys(model: nn.Module) -> set[str]:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        return set()
    return {f"head.{k}" for k in head.state_dict()}


def init_from(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    resize_pos_embed: bool = False,
    new_head: bool = False,
) -> InitReport:
    """Load the weights at ``path`` into ``model`` by name (see the module docstring); returns the report.

    Raises :class:`InitFromError` for shapes that differ (unless the flag for that tensor is given),
    for a file that shares no weights with the model, and for model weights outside the attention
    modules that the file lacks (a model of another architecture).
    """
    model = unwrap(model)
    state, meta, file = load_state_dict_file(path)
    target = model.state_dict()
    attn_prefixes = _attention_prefixes(model)
    heads = _head_keys(model)
    report = InitReport(path=str(path), file=str(file), source_meta=meta)
    if new_head and not heads:
        raise InitFromError("--new-head: the model has no 'head' module to re-create")

    load: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key]
        if new_head and key in heads:
            report.new_head.append(key)
            continue
        if value.shape == want.shape:
            load[key] = value
        elif key == "pos_embed" and resize_pos_embed:
            load[key] = _resized_pos(model, value, want)
            report.resized.append(f"pos_embed {tuple(value.shape)} -> {tuple(want.shape)}")
        elif _kind_specific(key, attn_prefixes):
            report.fresh.append(f"{key} {tuple(value.shape)} -> {tuple(want.shape)}")
        else:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want.shape)}")
    if mismatched:
        hints = []
        if any(m.startswith("pos_embed:") for m in mismatched):
            hints.append("--resize-pos-embed resamples the position embedding to the model's patch grid")
        if any(m.split(":")[0] in heads for m in mismatched):
            hints.append("--new-head re-creates the classifier for the model's number of classes")
        if any(m.startswith("patch_embed.") for m in mismatched):
            hints.append("the patch size / input channels differ: choose a model (--model-arg) that matches")
        raise InitFromError(
            f"--init-from {file}: {len(mismatched)} tensor(s) have other shapes than the model: "
            + "; ".join(mismatched[:6])
            + ("" if len(mismatched) <= 6 else f"; ... (+{len(mismatched) - 6})")
            + ("".join(f". Hint: {h}" for h in hints))
        )
    if not load:
        raise InitFromError(f"--init-from {file}: no tensor of the file matches the model's parameter names")

    not_loaded = [k for k in target if k not in load and k not in report.new_head]
    structural = [
        k for k in not_loaded if not _kind_specific(k, attn_prefixes) and not (new_head and k in heads)
    ]
    if structural:
        raise InitFromError(
            f"--init-from {file}: the file lacks {len(structural)} of the model's weights outside the "
            f"attention (another architecture?): {_short(structural)}"
        )
    report.missing = [k for k in not_loaded if _kind_specific(k, attn_prefixes)]
    with torch.no_grad():
        for key, value in load.items():
            target[key].copy_(value.to(dtype=target[key].dtype))  # state_dict() tensors share storage
    report.loaded = len(load)
    return report


def _resized_pos(model: nn.Module, value: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    if value.dim() != 3 or want.dim() != 3 or value.shape[-1] != want.shape[-1]:
        raise InitFromError(
            f"--resize-pos-embed: pos_embed {tuple(value.shape)} -> {tuple(want.shape)}: only the number "
            "of positions may differ, not the width"
        )
    grid = _grid_of(model)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if grid is None or want.shape[1] != prefix + grid[0] * grid[1]:
        raise InitFromError("--resize-pos-embed needs a ViT with a patch grid (patch_embed.grid_size)")
    return resample_pos_embed(value, grid, prefix)


# ---- attention-only fine-tuning -------------------------------------------------------------------------


def attn_only_names(model: nn.Module) -> list[str]:
    """Parameter names ``--attn-only`` trains: attention modules, the head and the position embedding."""
    model = unwrap(model)
    prefixes = tuple(_attention_prefixes(model)) + ("head.", "pos_embed")
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def freeze_for_attn_only(model: nn.Module) -> tuple[int, int]:
    """Set ``requires_grad=False`` on every parameter but the attention's, head's and position
    embedding's; returns ``(trainable, total)`` parameter counts."""
    model = unwrap(model)
    if not attention_modules(model):
        raise InitFromError("--attn-only: the model has no attention modules")
    keep = set(attn_only_names(model))
    if not any(n.startswith("head.") for n in keep):
        raise InitFromError("--attn-only: the model has no 'head' to train")
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        total += p.numel()
        trainable += p.numel() if name in keep else 0
    return trainable, total


# ---- the trainer hook --------------------------------------------------------------------------------


def apply(model: nn.Module, cfg: Any, *, resuming: bool = False, log: Callable[[str], None] | None = None):
    """The trainer's hook, called after the model is built and before the optimizer.

    Reads ``cfg.init_from``, ``cfg.resize_pos_embed``, ``cfg.new_head``, ``cfg.attn_only`` (missing
    fields count as off). Returns a dict for the run metadata (``{}`` when nothing was asked).
    ``resuming``: the run continues from its own checkpoint, so ``init_from`` is ignored (with a note);
    ``attn_only`` still applies (the optimizer state saved in the checkpoint is of the trainable subset).
    """
    log = log or (lambda msg: print(f"note: {msg}", file=sys.stderr))
    path = getattr(cfg, "init_from", None)
    resize = bool(getattr(cfg, "resize_pos_embed", False))
    head = bool(getattr(cfg, "new_head", False))
    if (resize or head) and not path:
        raise InitFromError("--resize-pos-embed and --new-head only apply with --init-from")
    out: dict[str, Any] = {}
    if path and resuming:
        log(f"--resume continues the run from its own checkpoint; --init-from {path} is ignored")
    elif path:
        report = init_from(model, path, resize_pos_embed=resize, new_head=head)
        for line in report.lines():
            log(line)
        out["init_from"] = report.to_dict()
    if getattr(cfg, "attn_only", False):
        trainable, total = freeze_for_attn_only(model)
        log(f"--attn-only: {trainable:,} of {total:,} parameters trainable (attention, head, pos_embed)")
        out["attn_only"] = {"trainable_params": trainable, "total_params": total}
    return out


def check_config(cfg: Any) -> None:
    """The checks of these settings that need no model: run before the run directory is created."""
    path = getattr(cfg, "init_from", None)
    if (getattr(cfg, "resize_pos_embed", False) or getattr(cfg, "new_head", False)) and not path:
        raise InitFromError("--resize-pos-embed and --new-head only apply with --init-from")
    if path and not Path(path).expanduser().exists():
        raise InitFromError(f"--init-from: {path} does not exist")
