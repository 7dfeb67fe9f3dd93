"""``python -m mita.data.report``: sizes, class balance and lengths of every task, plus rendered examples.

Prints a markdown table (the one in ``docs/data.md``) and, given ``--out DIR``, writes
``data_fmnist.png``, ``data_image.png``, ``data_pathfinder.png`` and, with ``fmnist-seg`` among the
tasks, ``data_fmnist_seg.png`` (scenes and their label maps) there (nothing is written without
an explicit directory: the repository's own figures are ``--out docs/img``). Building the full generated
sets fills the cache, so the first run takes a few minutes; ``--size N`` caps every split for a quick look.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..deps import require
from ..io import atomic_path, markdown_table, write_text
from ..system import positive_int
from .build import SPLITS, build_dataset
from .pathfinder import DIFFICULTIES
from .scenes import CLASS_COLOURS, SEG_CLASS_NAMES
from .tasks import TASKS

__all__ = ["task_stats", "render_examples", "main"]


def _lengths(ds) -> np.ndarray | None:
    if hasattr(ds, "left"):
        lengths = ds.lengths()
        return np.concatenate([lengths[ds.left], lengths[ds.right]])
    if hasattr(ds, "lengths"):
        return ds.lengths()
    return None


def task_stats(name: str, split: str, **kwargs) -> dict:
    """Size, per-class counts, unpadded lengths (sequence/pair tasks) and build time of one split."""
    t0 = time.perf_counter()
    ds = build_dataset(name, split, **kwargs)
    seconds = time.perf_counter() - t0
    if ds.info.kind == "segmentation":  # pixels per class over the first scenes (made on demand)
        counts = _pixel_counts(ds, min(len(ds), SEG_STATS_SCENES))
        return {
            "task": name, "split": split, "n": len(ds), "class_counts": counts.tolist(),
            "majority": float(counts.max() / max(counts.sum(), 1)), "length_mean": None, "length_min": None,
            "length_max": None, "seconds": seconds,
        }  # fmt: skip
    labels = np.asarray(ds.labels)
    counts = np.bincount(labels, minlength=ds.info.num_classes)
    lengths = _lengths(ds)
    return {
        "task": name,
        "split": split,
        "n": len(ds),
        "class_counts": counts.tolist(),
        "majority": float(counts.max() / max(len(ds), 1)),
        "length_mean": None if lengths is None else float(lengths.mean()),
        "length_min": None if lengths is None else int(lengths.min()),
        "length_max": None if lengths is None else int(lengths.max()),
        "seconds": seconds,
    }


SEG_STATS_SCENES = 256  # segmentation tasks: class counts are pixels of the first scenes


def _pixel_counts(ds, n: int) -> np.ndarray:
    counts = np.zeros(ds.info.num_classes, dtype=np.int64)
    for i in range(n):
        counts += np.bincount(ds[i][1].numpy().ravel(), minlength=ds.info.num_classes)
    return counts


def _markdown(rows: list[dict]) -> str:
    headers = ["task", "split", "examples", "per-class counts", "majority class", "length mean (min-max)",
               "build s"]  # fmt: skip
    cells = []
    for r in rows:
        length = (
            "-"
            if r["length_mean"] is None
            else f"{r['length_mean']:.0f} ({r['length_min']}-{r['length_max']})"
        )
        counts = " / ".join(str(c) for c in r["class_counts"])
        cells.append([r["task"], r["split"], f"{r['n']:,}", counts, f"{100 * r['majority']:.1f}%", length,
                      f"{r['seconds']:.1f}"])  # fmt: skip
    return markdown_table(headers, cells, align="llrlrlr")


def render_examples(img_dir: str | Path, root=None, cache_dir=None) -> list[Path]:
    """Write one figure per image task; returns the paths. Needs matplotlib (``pip install mita[plot]``)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("rendering examples needs matplotlib: pip install 'mita[plot]'") from e
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    classes = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    paths = []
    fm = build_dataset("fmnist", "train", root=root, size=64)
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.5))
    for ax, (title, x) in zip(
        axes, [("original", fm.images[0].float() / 255), ("augmented", None), ("augmented", None)]
    ):
        if x is None:
            x = fm[0][0][0]
        ax.imshow(x.numpy(), cmap="gray")
        ax.set_title(f"{title}: {classes[int(fm.labels[0])]}", fontsize=9)
        ax.axis("off")
    paths.append(_save(fig, img_dir / "data_fmnist.png", plt))

    im = build_dataset("image", "test", root=root, size=8)
    fig, axes = plt.subplots(1, 4, figsize=(8, 2.4))
    for ax, i in zip(axes, range(4)):
        x, y = im[i]
        ax.imshow((x - 1).reshape(32, 32).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{classes[y]} (1,024 tokens)", fontsize=8)
        ax.axis("off")
    paths.append(_save(fig, img_dir / "data_image.png", plt))

    fig, axes = plt.subplots(len(DIFFICULTIES), 4, figsize=(8, 6.4))
    for row, level in enumerate(DIFFICULTIES):
        ds = build_dataset("pathfinder", "test", difficulty=level, size=16, cache_dir=cache_dir)
        pos = [i for i in range(len(ds)) if ds[i][1] == 1][:2]
        neg = [i for i in range(len(ds)) if ds[i][1] == 0][:2]
        for ax, i in zip(axes[row], pos + neg):
            ax.imshow((ds[i][0] - 1).reshape(32, 32).numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{level}: {'connected' if ds[i][1] else 'not connected'}", fontsize=8)
            ax.axis("off")
    paths.append(_save(fig, img_dir / "data_pathfinder.png", plt))
    return paths


def render_scenes(path: str | Path, root=None, count: int = 4, **scene_kwargs) -> Path:
    """A grid of ``fmnist-seg`` test scenes (top row) and their label maps (bottom row), to ``path``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ds = build_dataset("fmnist-seg", "test", root=root, size=count, **scene_kwargs)
    fig, axes = plt.subplots(2, count, figsize=(2.2 * count, 4.6), squeeze=False)
    for col in range(count):
        picture, target, placed = ds.scene(col)
        axes[0, col].imshow(picture, cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(f"{len(placed)} items, {picture.shape[0]} px", fontsize=8)
        axes[1, col].imshow(CLASS_COLOURS[target], interpolation="nearest")
        names = sorted({SEG_CLASS_NAMES[c] for c in np.unique(target) if c})
        axes[1, col].set_title(", ".join(names), fontsize=7)
        for ax in axes[:, col]:
            ax.axis("off")
    return _save(fig, Path(path), plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``mita data``: print the table, optionally write it and the example figures; 2 on bad input."""
    p = argparse.ArgumentParser(prog="mita data", description=__doc__.split("\n\n")[0])
    labelled = [t for t, info in TASKS.items() if info.kind != "lm"]  # lm tasks have no class labels
    p.add_argument("--tasks", nargs="*", default=labelled, choices=labelled, help="tasks to describe")
    p.add_argument(
        "--size", type=positive_int, default=None, help="cap every split at N examples (quick look)"
    )
    p.add_argument("--data-root", help="data directory of the file-based tasks (default: each task's)")
    p.add_argument("--cache-dir", default=None, help="data cache (default $MITA_CACHE or ~/.cache/mita)")
    p.add_argument("--out", help="write the example figures to this directory (default: none)")
    p.add_argument("--no-images", action="store_true", help="skip the figures even with --out")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    images = args.out is not None and not args.no_images
    try:
        if images:
            require("matplotlib", purpose="mita data --out (the example figures)")
        rows = []
        for name in args.tasks:
            for split in SPLITS[name]:
                kwargs = {"cache_dir": args.cache_dir, "size": args.size}
                if name in ("fmnist", "image", "text", "retrieval", "fmnist-seg"):
                    kwargs["root"] = args.data_root
                if name == "fmnist":
                    kwargs["augment"] = False
                rows.append(task_stats(name, split, **kwargs))
                print(
                    f"# built {name}/{split}: {rows[-1]['n']} examples in {rows[-1]['seconds']:.1f}s",
                    flush=True,
                )
        table = _markdown(rows)
        print(table)
        if args.markdown:
            write_text(args.markdown, table + "\n")
        if images:
            paths = []
            if set(args.tasks) - {"fmnist-seg"}:  # the image tasks' figures
                paths += render_examples(args.out, root=args.data_root, cache_dir=args.cache_dir)
            if "fmnist-seg" in args.tasks:  # a grid of scenes with their label maps
                paths.append(render_scenes(Path(args.out) / "data_fmnist_seg.png", root=args.data_root))
            for path in paths:
                print(f"# wrote {path}")
        elif args.out is None and not args.no_images:
            print("# pass --out DIR for the example figures (docs/img holds the repository's)")
    except (ValueError, ImportError, OSError) as err:
        print(f"mita data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
