"""Record the routing of every MiTA attention layer of a model while it runs.

A layer takes part when it has a boolean ``record_routing`` attribute (``mita.nn.MiTAAttention`` does):
while it is True the layer's forward stores ``last_routing`` (a detached :class:`mita.Routing`) and
``last_layout`` (a dict with ``layout`` "grid" or "seq", ``grid`` (h, w), ``prefix_tokens`` and
``num_landmarks``). :class:`RoutingRecorder` switches the flag on, copies both after every forward
call through a forward hook, and restores everything on exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..ops import Routing
from .stats import LayerStats, layer_stats

__all__ = ["LayerRecord", "RoutingRecorder", "routing_layers"]


def routing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that can record their routing, in forward order."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, "record_routing", None), bool)
    ]


@dataclass
class LayerRecord:
    """What one layer routed over the recorded forward calls (batches kept in call order, on CPU)."""

    name: str
    routings: list[Routing] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)

    def routing(self) -> Routing:
        """All recorded batches concatenated along the batch dimension."""
        if not self.routings:
            raise ValueError(f"layer {self.name!r} recorded no forward call")
        return Routing(
            torch.cat([r.expert_index for r in self.routings]),
            torch.cat([r.key_index for r in self.routings]),
        )

    @property
    def prefix_tokens(self) -> int:
        """Leading tokens (cls, registers) that are not pooled into landmarks (0 when unknown)."""
        return int(self.layout.get("prefix_tokens", 0) or 0)

    def stats(self, *, padding_mask: torch.Tensor | None = None, empty: str = "skip") -> LayerStats:
        """:func:`mita.analysis.layer_stats` over every recorded batch."""
        r = self.routing()
        return layer_stats(
            r.expert_index,
            r.key_index,
            prefix_tokens=self.prefix_tokens,
            padding_mask=padding_mask,
            empty=empty,
        )


class RoutingRecorder:
    """Context manager that records every MiTA layer's routing during forward calls.

    Example::

        with RoutingRecorder(model) as rec:
            model(images)
        for layer in rec.layers:
            print(layer.name, layer.stats().pruned)

    Args:
        model: any module containing layers with a boolean ``record_routing`` attribute.
        device: where recorded indices are moved (default CPU, so that many batches fit).

    Raises:
        ValueError: when ``model`` has no such layer.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        found = routing_layers(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no MiTA attention layer (no module with a `record_routing` "
                "flag); build it with attention='mita' or mita.convert(model, 'mita')"
            )
        self._modules = [mod for _, mod in found]
        self.layers = [LayerRecord(name) for name, _ in found]
        self._saved: list[bool] = []
        self._handles: list[Any] = []

    def _hook(self, index: int):
        record = self.layers[index]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            routing = getattr(module, "last_routing", None)
            if routing is None:  # e.g. a layer that ran without MiTA this time
                return
            # small ints keep many recorded batches cheap; positions fit easily in int32
            record.routings.append(Routing(*(t.detach().to(self.device, torch.int32) for t in routing)))
            layout = dict(getattr(module, "last_layout", None) or {})
            # how landmarks are built decides where their windows are (drawn by ``mita viz``)
            layout.setdefault("landmarks", getattr(module, "landmarks_mode", "pool"))
            size = getattr(getattr(module, "landmark", None), "size", None)
            if size is not None:
                layout.setdefault("landmark_grid", tuple(size))
            record.layout = layout

        return hook

    def __enter__(self) -> RoutingRecorder:
        self._saved = [mod.record_routing for mod in self._modules]
        for i, mod in enumerate(self._modules):
            mod.record_routing = True
            mod.last_routing = None
            self._handles.append(mod.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for mod, flag in zip(self._modules, self._saved):
            mod.record_routing = flag
            mod.last_routing = None

    def clear(self) -> None:
        """Forget what was recorded so far (the hooks stay on)."""
        for record in self.layers:
            record.routings.clear()

    def run(self, batches: Iterable[Any], *, device: str | torch.device = "cpu") -> RoutingRecorder:
        """Run ``model`` (in eval mode, without gradients) on each batch; a batch may be a tensor or a
        ``(inputs, labels, ...)`` tuple/list whose first item is the model input (itself a tuple of
        tensors for pair tasks, passed as separate arguments)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if isinstance(x, (tuple, list)):  # pair tasks: two token tensors, two arguments
                        self.model(*(t.to(device) for t in x))
                    else:
                        self.model(x.to(device))
        finally:
            self.model.train(was_training)
        return self

    def stats(self, *, padding_mask: torch.Tensor | None = None, empty: str = "skip") -> list[LayerStats]:
        """Per-layer :class:`LayerStats`, in layer order."""
        return [layer.stats(padding_mask=padding_mask, empty=empty) for layer in self.layers]
