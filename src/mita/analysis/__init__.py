"""Look inside MiTA: record routing, compute per-layer statistics, draw figures.

- :class:`RoutingRecorder` records what every MiTA layer of a model routed during forward calls, with
  each layer's :class:`RoutingLayout` and the padding mask it was given;
- :mod:`mita.analysis.stats`: token pruning, expert load and key/query IoU from a :class:`mita.Routing`;
- ``mita eval`` (:mod:`.eval_cli`) evaluates a checkpoint, optionally with another attention or m and k;
- ``mita viz`` / ``mita grid`` / ``mita swap`` (modules :mod:`.viz`, :mod:`.grid`, :mod:`.swap`) draw
  figures and need matplotlib (``pip install mita[plot]``); they are imported only when used.
"""

from .hooks import LayerRecord, RoutingLayout, RoutingRecorder, routing_layers
from .stats import (
    LayerStats,
    expert_iou,
    expert_load,
    layer_stats,
    load_entropy,
    pruned_fraction,
    selection_counts,
)

__all__ = [
    "RoutingRecorder",
    "LayerRecord",
    "RoutingLayout",
    "routing_layers",
    "LayerStats",
    "layer_stats",
    "selection_counts",
    "pruned_fraction",
    "expert_load",
    "load_entropy",
    "expert_iou",
]
