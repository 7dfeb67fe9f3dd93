"""Checkpoints: model weights as safetensors (with the run's metadata inside), training state as a torch
file of plain values, and the RNG helpers whose states that file holds.

Layout of a run directory ``DIR``::

    DIR/model.safetensors               final weights (what ``mita eval --checkpoint`` reads)
    DIR/checkpoints/step-00000120.safetensors   weights at step 120
    DIR/checkpoints/step-00000120.pt            optimizer, scheduler, RNG, step, sampler position
    DIR/checkpoints/latest.json                 {"step": 120}: the newest *complete* pair

Every file is written through :func:`mita.io.atomic_path` (a temporary name, fsync, ``os.replace``,
mode 0644 like every file mita writes); ``latest.json`` is replaced only after both files of a pair are
in place, so a run killed at any moment leaves either the previous checkpoint or the new one, never a
torn one.

Nothing in a run directory is unpickled: the ``.pt`` file holds only tensors, numbers, strings, lists
and dicts (numpy's and Python's RNG states are stored as their components) and is read with
``torch.load(weights_only=True)``; a file that needs more (a crafted one, whose objects could run code)
is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mita.io import atomic_path, write_text

from .presets import build_model_from_meta

META_KEY = "mita_meta"
LATEST = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model or run it is loaded into."""


def _safetensors():
    try:
        import safetensors.torch as st  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "checkpoints need the 'safetensors' package: "
            "pip install safetensors (or pip install 'mita[train]')"
        ) from err
    return st


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_model_file(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable) to a safetensors file, atomically."""
    st = _safetensors()
    path = Path(path)
    with atomic_path(path) as tmp:
        st.save_model(unwrap(model), str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The run metadata stored in a safetensors file written by :func:`save_model_file`."""
    _safetensors()  # a clear ImportError when the package is missing
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        from safetensors import safe_open  # noqa: PLC0415

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
    file = resolve_model_path(path)
    meta = read_meta(file)
    why = "a buildable model"
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{file}: metadata does not describe {why} (no model builder name)")
    if not isinstance(meta.get("model_kwargs"), dict):
        raise CheckpointError(f"{file}: metadata does not describe {why} (no model_kwargs object)")
    try:
        model = build_model_from_meta(meta)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: metadata does not describe a buildable model ({err})") from None
    load_weights(model, file)
    model.mita_meta = meta  # lets evaluate(model, task) rebuild the data the way it was trained
    return model.to(device).eval(), meta


# ---- RNG states ------------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers (what ``weights_only=True`` loads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _no_space(err: BaseException) -> bool:
    """Whether a failed write ran out of disk (torch and safetensors report it in their own words)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "StorageFull" in text or "file write failed" in text


def write_failure(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a file of a run that could not be written."""
    if _no_space(err):
        return CheckpointError(f"no space left on device writing {path}; free space and --resume")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return CheckpointError(f"cannot write {path} ({first}); the last complete checkpoint is kept")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failure to write ``path`` (a full disk, an I/O error) into :func:`write_failure`'s error."""
    try:
        yield
    except Exception as err:  # torch and safetensors raise RuntimeError / their own types for I/O errors
        raise write_failure(path, err) from None


def save_checkpoint(
    ckpt_dir: str | os.PathLike, step: int, model: nn.Module, meta: dict[str, Any], state: dict[str, Any]
) -> None:
    """Write the weights and training ``state`` (tensors and plain values only) of ``step``, then point
    ``latest.json`` at them. Older checkpoint pairs are removed once the new one is complete.

    A write that fails (a full disk) removes the new pair's files and raises :class:`CheckpointError`;
    the previous checkpoint stays the latest."""
    ckpt_dir = Path(ckpt_dir)
    stem = ckpt_dir / f"step-{step:08d}"
    files = (stem.with_suffix(".safetensors"), stem.with_suffix(".pt"), ckpt_dir / LATEST)
    current = files[0]
    try:
        save_model_file(files[0], model, {**meta, "step": step})
        current = files[1]
        with atomic_path(files[1]) as tmp:
            torch.save({**state, "step": step}, tmp)
        current = files[2]
        write_text(files[2], json.dumps({"step": step}))
    except Exception as err:
        if latest_step(ckpt_dir) != step:  # an incomplete pair: no orphan left behind
            for f in files[:2]:
                f.unlink(missing_ok=True)
        raise write_failure(current, err) from None
    for old in ckpt_dir.glob("step-*"):
        if not old.name.startswith(stem.name):
            old.unlink(missing_ok=True)


def load_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """A training-state file read with ``torch.load(weights_only=True)``: tensors and plain values only.

    Anything else (pickled objects, which could run code while loading) raises :class:`CheckpointError`.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled objects, not only tensors and plain values "
                f"(crafted, or written by an older mita), and mita never unpickles run files ({why})"
            ) from None
        raise CheckpointError(f"cannot read training state {path}: {why or type(err).__name__}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a mita training state (a {type(state).__name__}, not a dict)")
    return state


def load_checkpoint(ckpt_dir: str | os.PathLike, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the newest checkpoint's weights into ``model``; return ``(meta, state)``.

    Raises :class:`CheckpointError` when there is none, or it is corrupt, crafted or from another model.
    """
    ckpt_dir = Path(ckpt_dir)
    step = latest_step(ckpt_dir)
    if step is None:
        raise CheckpointError(f"no checkpoint to resume from in {ckpt_dir}")
    stem = ckpt_dir / f"step-{step:08d}"
    state = load_state_file(stem.with_suffix(".pt"))  # before the weights: a refused file changes nothing
    meta = read_meta(stem.with_suffix(".safetensors"))
    load_weights(model, stem.with_suffix(".safetensors"))
    if state.get("step") != step or meta.get("step") != step:
        raise CheckpointError(f"{stem}: weights, state and latest.json disagree on the step")
    return meta, state
