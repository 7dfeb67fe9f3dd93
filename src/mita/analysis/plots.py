"""Matplotlib figures for routing analysis (imported lazily; needs ``pip install mita[plot]``).

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so they
neither need a display nor change the caller's global matplotlib backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_path
from .stats import LayerStats

__all__ = ["figure", "plot_pruning_maps", "plot_expert_maps", "plot_layer_curves", "plot_heatmap"]


def figure(width: float, height: float) -> Any:
    """A headless matplotlib Figure; ImportError naming the extra when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("mita's figures need matplotlib: pip install matplotlib (or 'mita[plot]')") from err
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, bbox_inches="tight", format="png")
    return path


def _grid_map(values: np.ndarray, grid: tuple[int, int], prefix: int) -> np.ndarray:
    h, w = grid
    return np.asarray(values[prefix : prefix + h * w], dtype=float).reshape(h, w)


def _show_image(ax: Any, image: np.ndarray | None, grid: tuple[int, int], alpha: float = 1.0) -> None:
    """Draw ``image`` stretched over the token grid (so token (r, c) is the cell [c, c+1] x [r, r+1])."""
    h, w = grid
    if image is not None:
        ax.imshow(image, cmap="gray", extent=(0, w, h, 0), alpha=alpha, interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_pruning_maps(
    path: str | Path,
    counts: np.ndarray,
    *,
    images: Sequence[np.ndarray | None] | None = None,
    grid: tuple[int, int] | None = None,
    prefix: int = 0,
    layer_names: Sequence[str] | None = None,
    padding: np.ndarray | None = None,
) -> Path:
    """Per-layer maps of how often each token is selected as a key (summed over landmarks and heads).

    Args:
        counts: ``[L, S, N]`` selection counts for ``L`` layers and ``S`` samples.
        images: ``S`` grayscale images drawn under the maps (grid layout only).
        grid: the ``(h, w)`` token grid; None draws 1-D maps (layers x positions, one panel per sample).
        prefix: leading tokens not on the grid (left out of the maps).
        padding: ``[S, N]`` bool, True at padding tokens (1-D maps: drawn grey, not counted as pruned).
    """
    counts = np.asarray(counts)
    n_layers, n_samples, n_tokens = counts.shape
    names = list(layer_names or [f"layer {i}" for i in range(n_layers)])
    if grid is None:
        fig = figure(10, 0.8 + (0.6 + 0.22 * n_layers) * n_samples)
        axes = fig.subplots(n_samples, 1, squeeze=False)[:, 0]
        for s, ax in enumerate(axes):
            real = np.ones(n_tokens, dtype=bool) if padding is None else ~np.asarray(padding[s], dtype=bool)
            real[:prefix] = False
            ax.set_facecolor("0.8")
            shown = np.ma.masked_where(np.broadcast_to(~real, counts[:, s].shape), counts[:, s])
            im = ax.imshow(shown, aspect="auto", cmap="magma", interpolation="nearest")
            ax.set_yticks(range(n_layers))
            ax.set_yticklabels([str(i + 1) for i in range(n_layers)], fontsize=7)
            ax.set_ylabel(f"sample {s}\nlayer", fontsize=8)
            pruned = (counts[:, s, real] == 0).mean(-1)
            ax.set_title(
                "pruned per layer: " + " ".join(f"{100 * p:.0f}%" for p in pruned), fontsize=8, loc="left"
            )
            fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="times selected")
        axes[-1].set_xlabel("token position")
        fig.suptitle("Keys selected by any landmark (all heads); black = pruned, grey = prefix/padding")
        return _save(fig, path)
    fig = figure(1.6 * (n_layers + 1), 1.7 * n_samples + 0.6)
    axes = fig.subplots(n_samples, n_layers + 1, squeeze=False)
    for s in range(n_samples):
        image = images[s] if images is not None else None
        _show_image(axes[s, 0], image, grid)
        axes[s, 0].set_title("input" if s == 0 else "", fontsize=8)
        for li in range(n_layers):
            ax = axes[s, li + 1]
            cmap = _grid_map(counts[li, s], grid, prefix)
            _show_image(ax, image, grid)
            shown = np.ma.masked_where(cmap > 0, np.ones_like(cmap))
            ax.imshow(shown, cmap="gray_r", vmin=0, vmax=1, extent=(0, grid[1], grid[0], 0), alpha=0.8)
            sel = np.ma.masked_where(cmap == 0, cmap)
            ax.imshow(
                sel, cmap="autumn", extent=(0, grid[1], grid[0], 0), alpha=0.45, interpolation="nearest"
            )
            title = f"{names[li]}\n" if s == 0 else ""
            ax.set_title(f"{title}{100 * (cmap == 0).mean():.0f}% pruned", fontsize=7)
    fig.suptitle("Tokens selected as keys by any landmark of any head (dark = pruned)", fontsize=10)
    return _save(fig, path)


def plot_expert_maps(
    path: str | Path,
    panels: Sequence[Sequence[dict[str, Any]]],
    *,
    num_tokens: int,
    image: np.ndarray | None = None,
    grid: tuple[int, int] | None = None,
    prefix: int = 0,
    row_names: Sequence[str] | None = None,
) -> Path:
    """Expert maps: for each row (a layer) and column (an expert), its landmark window, keys and queries.

    Each panel is a dict with ``window``, ``keys`` and ``queries`` (lists of token positions) and
    ``title``. With a ``grid`` the positions are drawn on the image (prefix tokens are not drawn);
    without one they are drawn as three strips along the sequence.
    """
    rows, cols = len(panels), max(len(r) for r in panels)
    fig = figure(2.4 * cols if grid else 3.2 * cols, (2.3 if grid else 1.4) * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ri, row in enumerate(panels):
        for ci in range(cols):
            ax = axes[ri, ci]
            if ci >= len(row):
                ax.axis("off")
                continue
            p = row[ci]
            if grid is not None:
                _show_image(ax, image, grid, alpha=0.5)
                wx, wy = _cells(p["window"], grid, prefix)
                if len(wx):
                    ax.add_patch(_rect(wx.min() - 0.5, wy.min() - 0.5, np.ptp(wx) + 1, np.ptp(wy) + 1))
                kx, ky = _cells(p["keys"], grid, prefix)
                qx, qy = _cells(p["queries"], grid, prefix)
                ax.scatter(qx, qy, s=9, c="tab:blue", marker="o", label="routed queries")
                ax.scatter(kx, ky, s=16, c="tab:red", marker="s", alpha=0.8, label="selected keys")
            else:
                for lo, hi in _runs(p["window"]):
                    ax.axvspan(lo - 0.5, hi + 0.5, color="tab:green", alpha=0.3)
                ax.vlines(p["keys"], 1.1, 1.9, color="tab:red", lw=0.8)
                ax.vlines(p["queries"], 0.1, 0.9, color="tab:blue", lw=0.8)
                ax.set_xlim(-0.5, num_tokens - 0.5)
                ax.set_ylim(0, 2)
                ax.set_yticks([0.5, 1.5])
                ax.set_yticklabels(["queries", "keys"], fontsize=6)
                ax.tick_params(axis="x", labelsize=6)
            ax.set_title(p.get("title", ""), fontsize=7)
        if row_names is not None:
            axes[ri, 0].set_ylabel(row_names[ri], fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Experts: landmark window (green), selected keys (red), routed queries (blue)", fontsize=10)
    return _save(fig, path)


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions as inclusive runs of consecutive values ([1, 2, 3, 7] -> [(1, 3), (7, 7)])."""
    runs: list[tuple[int, int]] = []
    for t in sorted(positions):
        if runs and t == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    return runs


def _cells(pos: Sequence[int], grid: tuple[int, int], prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre coordinates (x, y) of token positions on the grid; prefix/suffix tokens dropped."""
    h, w = grid
    t = np.asarray([x - prefix for x in pos if prefix <= x < prefix + h * w], dtype=int)
    return t % w + 0.5, t // w + 0.5


def _rect(x: float, y: float, w: float, h: float) -> Any:
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    return Rectangle((x, y), w, h, fill=False, edgecolor="tab:green", lw=2)


def plot_layer_curves(path: str | Path, stats: Sequence[LayerStats], *, title: str = "") -> Path:
    """Per-layer pruned fraction, key/query mIoU (with the per-head min-max band) and load balance."""
    layers = np.arange(1, len(stats) + 1)

    def col(name: str) -> np.ndarray:
        return np.asarray([getattr(s, name) for s in stats], dtype=float)

    fig = figure(12, 3.3)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(layers, col("pruned"), "o-", label="per head (mean)")
    ax1.plot(layers, col("pruned_all_heads"), "s--", label="by any head")
    ax1.set_title("tokens selected by no landmark", fontsize=9)
    ax1.set_ylim(0, 1)
    ax2.fill_between(layers, col("iou_head_min"), col("iou_head_max"), alpha=0.25, label="per-head min-max")
    ax2.plot(layers, col("iou_mean"), "o-", label="mean")
    ax2.set_title("IoU(expert keys, routed queries)", fontsize=9)
    ax2.set_ylim(0, 1)
    ax3.plot(layers, col("load_entropy_norm"), "o-", label="load entropy / log m")
    ax3.plot(layers, col("empty_experts"), "s--", label="empty experts")
    ax3.set_title("expert load balance", fontsize=9)
    ax3.set_ylim(0, 1.05)
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_heatmap(
    path: str | Path,
    values: np.ndarray,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    mark: tuple[int, int] | None = None,
    fmt: str = "{:.1f}",
) -> Path:
    """Annotated heatmap (NaN cells grey and labelled "-"); ``mark`` outlines one cell (row, col)."""
    values = np.asarray(values, dtype=float)
    fig = figure(1.0 + 0.7 * len(col_labels), 1.0 + 0.5 * len(row_labels))
    ax = fig.subplots()
    ax.set_facecolor("0.85")
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (r, c), v in np.ndenumerate(values):
        text = "-" if not np.isfinite(v) else fmt.format(v)
        ax.text(c, r, text, ha="center", va="center", fontsize=8, color="white" if v < mid else "black")
    if mark is not None:
        ax.add_patch(_outline(mark[1] - 0.5, mark[0] - 0.5))
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _outline(x: float, y: float) -> Any:
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    return Rectangle((x, y), 1, 1, fill=False, edgecolor="red", lw=2.5)
