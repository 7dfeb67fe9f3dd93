"""The segmentation figure of ``mita viz``: image, ground truth and prediction of a few test scenes.

Label maps use one fixed colour per class (background black), with a legend of the classes present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.scenes import CLASS_COLOURS
from . import plots

__all__ = ["plot_segmentation", "CLASS_COLOURS"]


def _colour(labels: np.ndarray) -> np.ndarray:
    return CLASS_COLOURS[np.clip(labels, 0, len(CLASS_COLOURS) - 1)]


@torch.no_grad()
def plot_segmentation(
    model: nn.Module,
    dataset: Dataset,
    path: str | Path,
    *,
    samples: int = 4,
    device: str = "cpu",
    class_names: tuple[str, ...] | None = None,
) -> Path:
    """One row per scene (the first ``samples``): image, ground truth, prediction, pixel accuracy."""
    was_training = model.training
    model.eval()
    n = min(samples, len(dataset))
    xs, ys = zip(*(dataset[i] for i in range(n)))
    logits = model(torch.stack(xs).to(device))
    model.train(was_training)
    preds = logits.argmax(1).cpu().numpy()
    fig = plots.figure(7.5, 2.5 * n)
    axes = fig.subplots(n, 3, squeeze=False)
    for row in range(n):
        image, truth, pred = xs[row][0].numpy(), ys[row].numpy(), preds[row]
        acc = float((truth == pred).mean())
        for ax, picture, title in (
            (axes[row, 0], None, "image"),
            (axes[row, 1], truth, "ground truth"),
            (axes[row, 2], pred, f"prediction ({100 * acc:.1f}% of pixels)"),
        ):
            if picture is None:
                ax.imshow(image, cmap="gray")
            else:
                ax.imshow(_colour(picture), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    present = sorted(set(np.unique(torch.stack(ys).numpy()).tolist()) | set(np.unique(preds).tolist()))
    if class_names:
        from matplotlib.patches import Patch  # noqa: PLC0415

        handles = [
            Patch(color=CLASS_COLOURS[c], label=class_names[c]) for c in present if c < len(class_names)
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8)
    return plots._save(fig, path)
