"""Checkpoints: model weights as safetensors (with the run's metadata inside), training state as a torch file.

Layout of a run directory ``DIR``::

    DIR/model.safetensors               final weights (what ``mita eval --checkpoint`` reads)
    DIR/checkpoints/step-00000120.safetensors   weights at step 120
    DIR/checkpoints/step-00000120.pt            optimizer, scheduler, RNG, step, sampler position
    DIR/checkpoints/latest.json                 {"step": 120}: the newest *complete* pair

Every file is written to a temporary name in the same directory and renamed with ``os.replace``
(atomic on POSIX); ``latest.json`` is replaced only after both files of a pair are in place, so a
run killed at any moment leaves either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_KEY = "mita_meta"
LATEST = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model or run it is loaded into."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "checkpoints need the 'safetensors' package: "
            "pip install safetensors (or pip install 'mita[train]')"
        ) from err
    return st


@contextlib.contextmanager
def _atomic_path(final: Path):
    """Yield a temporary path next to ``final``; rename it over ``final`` on success, delete it on error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:  # flush to disk before the rename makes the file visible
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_model_file(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable) to a safetensors file, atomically."""
    st = _safetensors()
    path = Path(path)
    with _atomic_path(path) as tmp:
        st.save_model(unwrap(model), str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The run metadata stored in a safetensors file written by :func:`save_model_file`."""
    _safetensors()  # a clear ImportError when the package is missing
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    if raw is None:
        raise CheckpointError(f"{path} has no '{META_KEY}' metadata: it was not written by mita train")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt '{META_KEY}' metadata ({err})") from err


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors file into ``model`` strictly; mismatches raise :class:`CheckpointError`."""
    st = _safetensors()
    try:
        missing, unexpected = st.load_model(unwrap(model), str(path), strict=False)
    except Exception as err:
        raise CheckpointError(f"cannot load weights from {path}: {err}") from err
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: {len(missing)} missing keys {sorted(missing)[:5]}, "
            f"{len(unexpected)} unexpected keys {sorted(unexpected)[:5]}"
        )


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run directory (its ``model.safetensors``, else its latest checkpoint) or a ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        final = path / "model.safetensors"
        if final.is_file():
            return final
        latest = latest_step(path / "checkpoints")
        if latest is not None:
            return path / "checkpoints" / f"step-{latest:08d}.safetensors"
        raise CheckpointError(f"{path} holds neither model.safetensors nor a checkpoints/ directory")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was trained with and load its weights.

    Args:
        path: a ``.safetensors`` file written by ``mita train`` or a run directory.
        device: where to put the model.

    Returns:
        ``(model, meta)``; the model is in eval mode. ``meta`` holds ``task``, ``attention``, ``model``
        (builder name), ``model_kwargs`` (everything needed to rebuild it), ``preset``, ``step`` and the
        task description (``task_info``) and the data settings (``data_kwargs``, e.g. a cut ``seq_len``);
        it is also attached to the model as ``model.mita_meta``.
    """
    from .presets import build_model_from_meta

    file = resolve_model_path(path)
    meta = read_meta(file)
    try:
        model = build_model_from_meta(meta)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: metadata does not describe a buildable model ({err})") from err
    load_weights(model, file)
    model.mita_meta = meta  # lets evaluate(model, task) rebuild the data the way it was trained
    return model.to(device).eval(), meta


# ---- training state -------------------------------------------------------------------------------


def latest_step(ckpt_dir: str | os.PathLike) -> int | None:
    """Step of the newest complete checkpoint in ``ckpt_dir``, or None when there is none."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.is_file():
        return None
    try:
        return int(json.loads(marker.read_text())["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{marker} is corrupt ({err})") from err


def save_checkpoint(
    ckpt_dir: str | os.PathLike, step: int, model: nn.Module, meta: dict[str, Any], state: dict[str, Any]
) -> None:
    """Write the weights and training ``state`` of ``step``, then point ``latest.json`` at them.

    Older checkpoint pairs are removed once the new one is complete.
    """
    ckpt_dir = Path(ckpt_dir)
    stem = ckpt_dir / f"step-{step:08d}"
    save_model_file(stem.with_suffix(".safetensors"), model, {**meta, "step": step})
    with _atomic_path(stem.with_suffix(".pt")) as tmp:
        torch.save({**state, "step": step}, tmp)
    with _atomic_path(ckpt_dir / LATEST) as tmp:
        tmp.write_text(json.dumps({"step": step}))
    for old in ckpt_dir.glob("step-*"):
        if not old.name.startswith(stem.name):
            old.unlink(missing_ok=True)


def load_checkpoint(ckpt_dir: str | os.PathLike, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the newest checkpoint's weights into ``model``; return ``(meta, state)``.

    Raises :class:`CheckpointError` when there is none, or it is corrupt or from another model.
    """
    ckpt_dir = Path(ckpt_dir)
    step = latest_step(ckpt_dir)
    if step is None:
        raise CheckpointError(f"no checkpoint to resume from in {ckpt_dir}")
    stem = ckpt_dir / f"step-{step:08d}"
    meta = read_meta(stem.with_suffix(".safetensors"))
    load_weights(model, stem.with_suffix(".safetensors"))
    try:
        state = torch.load(stem.with_suffix(".pt"), map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read training state {stem.with_suffix('.pt')}: {err}") from err
    if state.get("step") != step or meta.get("step") != step:
        raise CheckpointError(f"{stem}: weights, state and latest.json disagree on the step")
    return meta, state
