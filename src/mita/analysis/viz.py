"""``mita viz``: routing figures and statistics of a trained MiTA checkpoint.

``mita viz --checkpoint PATH --out DIR [--samples N] [--test-size M]`` writes to DIR:

- ``pruning_maps.png``: per layer, the tokens selected as keys by any landmark of any head, over the
  first N test inputs (2-D over the image for grid models, layers x positions for sequence models);
- ``expert_maps.png``: for a few layers of the first input and one head, the most-loaded experts:
  landmark window, selected keys and routed queries;
- ``layer_curves.png``: per layer, the pruned fraction, the key/query IoU and the load balance;
- ``stats.json``: the per-layer :class:`mita.analysis.LayerStats` over M test inputs;
- segmentation checkpoints also get ``segmentation.png``: image, ground truth and prediction of the first
  N test scenes (:mod:`mita.analysis.segviz`); the routing figures are then those of the encoder's MiTA
  layers (expert maps drawn over the scene), if it has any.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.scenes import SEG_CLASS_NAMES
from ..io import write_json
from ..system import positive_int
from . import plots
from .hooks import LayerRecord, RoutingLayout, RoutingRecorder, routing_layers
from .loading import add_eval_args, check_eval_args, check_writable, eval_dataset, load_checkpoint
from .segviz import plot_segmentation
from .stats import expert_iou, expert_load, layer_stats, selection_counts
from .windows import adaptive_span, landmark_grid, landmark_windows_1d, landmark_windows_2d

__all__ = ["visualize", "main"]


def _record(model: nn.Module, dataset: Dataset, n: int, batch_size: int, device: str) -> RoutingRecorder:
    loader = DataLoader(Subset(dataset, range(min(n, len(dataset)))), batch_size=batch_size, shuffle=False)
    with RoutingRecorder(model) as rec:
        rec.run(loader, device=device)
    return rec


def _display_image(x: Any, grid: tuple[int, int] | None) -> np.ndarray | None:
    """A grayscale picture of one input to draw under grid maps (None when the input is not an image)."""
    if grid is None or not isinstance(x, torch.Tensor):
        return None
    if x.is_floating_point() and x.dim() == 3:  # [C, H, W] image
        return x.float().mean(0).numpy()
    if x.dim() == 1:  # pixel-token sequence (token = value + 1): draw it as its square raster
        side = math.isqrt(x.numel())
        if side * side == x.numel():
            return x.float().reshape(side, side).numpy()
    return None


def _windows(layout: RoutingLayout, n: int, padding: torch.Tensor | None = None) -> list[list[int]]:
    """Token positions each landmark is pooled from (empty lists for landmarks that are not pooled).

    ``padding`` ([N] bool) matters for 1-D pooling, which averages over the valid tokens only.
    """
    m, prefix = layout.num_landmarks, layout.prefix_tokens
    if layout.landmark_mode == "official":  # cls + patches but the last, as a side x side grid
        side = math.isqrt(n)
        return landmark_windows_2d((side, side), layout.landmark_grid or landmark_grid(m, (side, side)))
    if layout.landmark_mode != "pool":  # learned / random / conv landmarks have no pooling window
        return [[] for _ in range(m)]
    if layout.layout == "grid":
        return landmark_windows_2d(
            layout.grid, layout.landmark_grid or landmark_grid(m, layout.grid), prefix=prefix
        )
    if padding is not None:
        valid = [t for t in range(prefix, n) if not bool(padding[t])]
        return [[valid[i] for i in adaptive_span(j, len(valid), m)] for j in range(m)]
    return landmark_windows_1d(n, m, prefix=prefix)


def _pick_layers(count: int, most: int = 4) -> list[int]:
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _expert_panels(
    layers: Sequence[LayerRecord],
    picks: Sequence[int],
    head: int,
    experts: int,
    padding: torch.Tensor | None,
) -> list[list[dict[str, Any]]]:
    """For each picked layer: the ``experts`` most-loaded experts of sample 0, head ``head``.

    ``padding`` ([1, N] bool or None) keeps padded queries out of the panels and the IoU.
    """
    rows = []
    for li in picks:
        r = layers[li].routing()
        ei, ki = r.expert_index[:1, head : head + 1].long(), r.key_index[:1, head : head + 1].long()
        n, m = ei.shape[2], ki.shape[2]
        load = expert_load(ei, m, padding_mask=padding)[0, 0]
        iou = expert_iou(ei, ki, padding_mask=padding)[0, 0]
        windows = _windows(layers[li].layout, n, None if padding is None else padding[0])
        real = torch.ones(n, dtype=torch.bool) if padding is None else ~padding[0]
        row = []
        for j in load.argsort(descending=True)[:experts].tolist():
            queries = ((ei[0, 0] == j).any(-1) & real).nonzero().flatten().tolist()
            row.append(
                {
                    "window": windows[j],
                    "keys": ki[0, 0, j].tolist(),
                    "queries": queries,
                    "title": f"expert {j}: {len(queries)} q, IoU {float(iou[j]):.2f}",
                }
            )
        rows.append(row)
    return rows


def visualize(
    model: nn.Module,
    dataset: Dataset,
    out: str | Path,
    *,
    samples: int = 4,
    stats_samples: int = 256,
    head: int = 0,
    experts: int = 4,
    batch_size: int = 64,
    device: str = "cpu",
    title: str = "",
) -> dict[str, Any]:
    """Write the figures and ``stats.json`` for ``model`` on the first inputs of ``dataset``.

    Returns the JSON report (per-layer statistics and the files written).
    """
    if samples < 1 or stats_samples < 1:
        raise ValueError(f"samples ({samples}) and stats_samples ({stats_samples}) must be >= 1")
    out = Path(out)
    model = model.to(device)
    rec = _record(model, dataset, max(samples, stats_samples), batch_size, device)
    if not rec.layers[0].routings:
        raise ValueError("the model ran but no MiTA layer recorded a routing (is its attention MiTA?)")
    layout = rec.layers[0].layout
    prefix = layout.prefix_tokens
    n = rec.layers[0].routings[0].expert_index.shape[2]
    padding = rec.layers[0].padding_mask()  # the mask the model gave its attention, as recorded
    if padding is not None and not bool(padding.any()):
        padding = None
    ns = min(stats_samples, len(dataset))
    stats = []
    for layer in rec.layers:
        r, pad = layer.routing(), layer.padding_mask()
        stats.append(
            layer_stats(
                r.expert_index[:ns],
                r.key_index[:ns],
                prefix_tokens=layer.prefix_tokens,
                padding_mask=None if pad is None else pad[:ns],
            )
        )
    grid = layout.grid
    names = [f"layer {i + 1}" for i in range(len(rec.layers))]
    heads = rec.layers[0].routings[0].key_index.shape[1]
    if not 0 <= head < heads:
        raise ValueError(f"head={head} must be in 0..{heads - 1}")

    shown = min(samples, len(dataset))
    counts = np.stack(
        [selection_counts(layer.routing().key_index[:shown], n).sum(1).numpy() for layer in rec.layers]
    )
    images = [_display_image(dataset[i][0], grid) for i in range(shown)]
    files = [
        plots.plot_pruning_maps(
            out / "pruning_maps.png",
            counts,
            images=images,
            grid=grid,
            prefix=prefix,
            layer_names=names,
            padding=None if padding is None else padding[:shown].numpy(),
        )
    ]
    picks = _pick_layers(len(rec.layers))
    panels = _expert_panels(rec.layers, picks, head, experts, None if padding is None else padding[:1])
    files.append(
        plots.plot_expert_maps(
            out / "expert_maps.png",
            panels,
            num_tokens=n,
            image=images[0],
            grid=grid,
            prefix=prefix,
            row_names=[f"{names[i]}, head {head}" for i in picks],
        )
    )
    files.append(plots.plot_layer_curves(out / "layer_curves.png", stats, title=title))
    report = {
        "samples_for_stats": ns,
        "layout": layout.to_dict(),
        "layers": [{"name": rec.layers[i].name, **s.to_dict()} for i, s in enumerate(stats)],
        "files": [p.name for p in files] + ["stats.json"],
    }
    write_json(out / "stats.json", report)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mita viz", description="Routing figures and statistics of a checkpoint."
    )
    p.add_argument(
        "--checkpoint", required=True, help="model.safetensors, a checkpoint file, or a run directory"
    )
    p.add_argument("--out", required=True, help="directory for the PNG figures and stats.json")
    p.add_argument(
        "--samples", type=positive_int, default=4, help="test inputs drawn in the maps (default 4)"
    )
    p.add_argument(
        "--test-size",
        type=positive_int,
        default=256,
        help="first N test inputs for the statistics (default 256)",
    )
    p.add_argument("--head", type=int, default=0, help="head shown in the expert maps")
    p.add_argument("--experts", type=positive_int, default=4, help="experts per layer in the expert maps")
    add_eval_args(p, batch_size=64, test_size=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mita viz``: see the module docstring."""
    args = _parser().parse_args(argv)
    try:
        device = check_eval_args(args, "mita viz", figures=True)
        model, meta = load_checkpoint(args.checkpoint, purpose="mita viz")
        check_writable(args.out, directory=True)
        dataset = eval_dataset(
            meta, root=args.data_root, cache_dir=args.cache_dir, size=max(args.samples, args.test_size)
        )
        seg_files = _segmentation_figure(model, dataset, args.out, args.samples, device)
        if seg_files:  # a segmenter: the routing figures are its encoder's, over the scene
            model = getattr(model, "encoder", model)
            if not routing_layers(model):
                print(
                    f"wrote {', '.join(seg_files)} to {args.out} (no MiTA encoder layer: no routing figures)"
                )
                return 0
        report = visualize(
            model,
            dataset,
            args.out,
            samples=args.samples,
            stats_samples=args.test_size,
            head=args.head,
            experts=args.experts,
            batch_size=args.batch_size,
            device=device,
            title=f"{meta.get('task')} / {meta.get('attention')} ({Path(args.checkpoint).name})",
        )
    except (ValueError, ImportError, OSError) as err:
        print(f"mita viz: error: {err}", file=sys.stderr)
        return 2
    for layer in report["layers"]:
        print(
            f"{layer['name']}: pruned {100 * layer['pruned']:.1f}% "
            f"(by all heads {100 * layer['pruned_all_heads']:.1f}%), IoU {layer['iou_mean']:.3f}, "
            f"load entropy {layer['load_entropy_norm']:.2f}, "
            f"empty experts {100 * layer['empty_experts']:.1f}%"
        )
    print(f"wrote {', '.join(seg_files + report['files'])} to {args.out}")
    return 0


def _segmentation_figure(
    model: nn.Module, dataset: Dataset, out: str, samples: int, device: str
) -> list[str]:
    """``segmentation.png`` for a segmentation task's checkpoint (else nothing); the file names written."""
    info = getattr(dataset, "info", None)
    if getattr(info, "kind", None) != "segmentation":
        return []
    names = SEG_CLASS_NAMES if info.num_classes == len(SEG_CLASS_NAMES) else None
    model = model.to(device)
    path = plot_segmentation(model, dataset, Path(out) / "segmentation.png", samples=samples, device=device,
                             class_names=names)  # fmt: skip
    return [path.name]
