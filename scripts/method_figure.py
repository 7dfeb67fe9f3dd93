"""Draw README's method figure, docs/img/method.png, from mita's own routing.

A Fashion-MNIST test image cut into 2x2 patches is a 14 x 14 token grid (the 197-token ViT without its
cls token); queries and keys are fixed random projections of each token's pixels and position. Then:

1. landmarks = average-pooled queries (``mita.landmarks.pool_2d``, 5 x 5 windows, m = 25);
2. ``mita_attention(..., return_routing=True)`` gives each landmark's top-k keys (``key_index``) and
   each query's expert (``expert_index``, argmax_j q . r_j);
3. the figure shows the windows, the routing of every query, and one expert: its window, its k keys and
   the queries routed to it.

Usage: ``python3 scripts/method_figure.py [--out docs/img/method.png]`` (needs matplotlib: mita[plot];
without the Fashion-MNIST package it draws on a synthetic image).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mita import mita_attention
from mita.analysis.plots import figure
from mita.analysis.windows import landmark_windows_2d
from mita.data import build_dataset
from mita.landmarks import pool_2d

GRID = (14, 14)
LANDMARKS = (5, 5)
TOPK = 25
DIM = 16


def _image() -> np.ndarray:
    """A 28 x 28 grayscale image in [0, 1]: the first Fashion-MNIST test image, else a synthetic one."""
    try:
        x, _ = build_dataset("fmnist", "test")[0]
        img = x[0].numpy()
        return (img - img.min()) / (img.max() - img.min())
    except (OSError, ValueError, ImportError):
        yy, xx = np.mgrid[0:28, 0:28] / 27.0
        return np.clip(1.2 - 6 * ((xx - 0.5) ** 2 + 0.5 * (yy - 0.45) ** 2), 0, 1)


def tokens_qk(img: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``[1, 1, 196, DIM]`` from 2x2 pixel patches plus a 2-D sinusoidal position code."""
    h, w = GRID
    patches = torch.tensor(img, dtype=torch.float64).reshape(h, 2, w, 2).permute(0, 2, 1, 3).reshape(h * w, 4)
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = [f(t.reshape(-1, 1) * s) for t in (r, c) for s in (0.25, 0.5) for f in (torch.sin, torch.cos)]
    feats = torch.cat([patches * 2, *pos], dim=1).double()
    g = torch.Generator().manual_seed(seed)
    wq, wk = (torch.randn(feats.shape[1], DIM, generator=g, dtype=torch.float64) for _ in range(2))
    return (feats @ wq)[None, None], (feats @ wk)[None, None]


def route(img: np.ndarray) -> dict[str, np.ndarray]:
    """The library's routing on the toy: landmark windows, each query's expert, each landmark's keys."""
    q, k = tokens_qk(img)
    landmarks = pool_2d(q, GRID, LANDMARKS)
    _, routing = mita_attention(
        q, k, k.clone(), landmarks, topk=TOPK, backend="reference", return_routing=True
    )
    return {
        "windows": landmark_windows_2d(GRID, LANDMARKS),
        "expert": routing.expert_index[0, 0, :, 0].numpy(),
        "keys": routing.key_index[0, 0].numpy(),
    }


def draw(img: np.ndarray, r: dict, out: Path) -> Path:
    from matplotlib import colormaps  # noqa: PLC0415 - optional dependency
    from matplotlib.colors import ListedColormap  # noqa: PLC0415 - optional dependency
    from matplotlib.patches import Rectangle  # noqa: PLC0415 - optional dependency

    h, w = GRID
    counts = np.bincount(r["expert"], minlength=len(r["windows"]))
    shown = int(np.argsort(counts)[(4 * len(counts)) // 5])  # a well-used expert, not the busiest
    fig = figure(10.5, 3.9)
    axes = fig.subplots(1, 3)
    titles = (
        f"1. m = {len(r['windows'])} landmarks:\naverage-pooled queries",
        "2. routing: each query joins\nthe expert of argmax$_j$ q·r$_j$",
        f"3. expert {shown}: its top-{TOPK} keys (red)\nand its {counts[shown]} routed queries (blue)",
    )
    for ax, title in zip(axes, titles):
        ax.imshow(img, cmap="gray", extent=(0, w, h, 0), alpha=0.45, interpolation="nearest")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)

    def box(ax, window, **kw):
        rows, cols = np.asarray(window) // w, np.asarray(window) % w
        ax.add_patch(
            Rectangle((cols.min(), rows.min()), np.ptp(cols) + 1, np.ptp(rows) + 1, fill=False, **kw)
        )
        return cols.mean() + 0.5, rows.mean() + 0.5

    for j, window in enumerate(r["windows"]):
        cx, cy = box(axes[0], window, edgecolor="tab:green", lw=0.8, alpha=0.8)
        axes[0].plot(cx, cy, "o", color="tab:green", ms=5)
        axes[0].text(cx + 0.3, cy - 0.3, str(j), fontsize=6, color="darkgreen")

    palette = ListedColormap([*colormaps["tab20"].colors, *colormaps["Set1"].colors][: len(r["windows"])])
    axes[1].imshow(
        r["expert"].reshape(h, w), cmap=palette, vmin=-0.5, vmax=len(r["windows"]) - 0.5,
        extent=(0, w, h, 0), alpha=0.75, interpolation="nearest",
    )  # fmt: skip
    box(axes[1], r["windows"][shown], edgecolor="black", lw=2)

    box(axes[2], r["windows"][shown], edgecolor="tab:green", lw=2)
    keys, queries = r["keys"][shown], np.flatnonzero(r["expert"] == shown)
    axes[2].scatter(keys % w + 0.5, keys // w + 0.5, s=40, marker="s", c="tab:red", alpha=0.85, label="keys")
    axes[2].scatter(queries % w + 0.5, queries // w + 0.5, s=14, c="tab:blue", label="routed queries")
    fig.suptitle(
        f"MiTA on a {h}x{w} token grid: each query attends, in one softmax, to the m landmarks "
        f"(shared expert) and its expert's k keys",
        fontsize=9.5,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", format="png")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/img/method.png")
    args = ap.parse_args(argv)
    img = _image()
    print(draw(img, route(img), args.out))


if __name__ == "__main__":
    main()
