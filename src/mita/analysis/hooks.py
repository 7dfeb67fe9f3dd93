"""Record the routing of every MiTA attention layer of a model while it runs.

A layer takes part when it has a boolean ``record_routing`` attribute (``mita.nn.MiTAAttention`` does).
When the recorder attaches it reads, once, where the layer's tokens and landmarks sit (a
:class:`RoutingLayout`: ``layout``, ``grid``, ``prefix_tokens``, ``num_landmarks``, ``landmark_mode`` and
the landmark grid ``landmark.size``), and switches the flag on. While it is on, the layer's forward
stores ``last_routing`` (a detached :class:`mita.Routing`), ``last_key_padding_mask`` (``[B, N]`` bool,
True = padding, or None) and ``last_layout`` (its resolved ``grid`` when that depends on the input); a
forward hook copies them after every call. Everything is restored on exit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..ops import Routing
from .stats import LayerStats, layer_stats

__all__ = ["LayerRecord", "RoutingLayout", "RoutingRecorder", "routing_layers"]


def routing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that can record their routing, in forward order."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, "record_routing", None), bool)
    ]


def _pair(value: Any) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class RoutingLayout:
    """Where one MiTA layer's tokens and landmarks sit (what drawing its routing needs).

    ``layout`` is ``"grid"`` (``prefix_tokens`` leading tokens, an ``h x w`` patch ``grid`` in raster
    order, then any suffix) or ``"seq"`` (``prefix_tokens``, then a 1-D sequence; ``grid`` None).
    ``landmark_mode`` is how landmarks are built (``"pool"``, ``"official"``, ``"random"``, ``"learned"``,
    ``"conv"``); ``landmark_grid`` the ``(mh, mw)`` grid they are pooled to, when they are pooled in 2-D.
    """

    layout: str
    grid: tuple[int, int] | None
    prefix_tokens: int
    num_landmarks: int
    landmark_mode: str
    landmark_grid: tuple[int, int] | None

    @classmethod
    def of(cls, name: str, module: nn.Module) -> RoutingLayout:
        """Read the layout of ``module`` (named ``name``); ValueError naming what it does not say."""
        mode = getattr(module, "landmark_mode", None)
        values = {
            "layout": getattr(module, "layout", None),
            "prefix_tokens": getattr(module, "prefix_tokens", None),
            "num_landmarks": getattr(module, "num_landmarks", None),
            "landmark_mode": mode,
        }
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise ValueError(f"layer {name!r} records its routing but does not say its {', '.join(missing)}")
        if values["layout"] not in ("grid", "seq"):
            raise ValueError(f"layer {name!r} has layout {values['layout']!r}, not 'grid' or 'seq'")
        landmark_grid = getattr(getattr(module, "landmark", None), "size", None)
        return cls(
            layout=str(values["layout"]),
            grid=_pair(getattr(module, "grid", None)) if values["layout"] == "grid" else None,
            prefix_tokens=int(values["prefix_tokens"]),
            num_landmarks=int(values["num_landmarks"]),
            landmark_mode=str(mode),
            landmark_grid=_pair(landmark_grid),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON: pairs as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class LayerRecord:
    """What one layer routed over the recorded forward calls (batches kept in call order, on CPU)."""

    name: str
    layout: RoutingLayout
    routings: list[Routing] = field(default_factory=list)
    padding: list[torch.Tensor | None] = field(default_factory=list)  # per batch: [B, N] bool or None

    def routing(self) -> Routing:
        """All recorded batches concatenated along the batch dimension."""
        if not self.routings:
            raise ValueError(f"layer {self.name!r} recorded no forward call")
        return Routing(
            torch.cat([r.expert_index for r in self.routings]),
            torch.cat([r.key_index for r in self.routings]),
        )

    def padding_mask(self) -> torch.Tensor | None:
        """``[B, N]`` bool, True at the padding tokens the layer was given, over every recorded batch;
        None when no batch had padding."""
        if all(p is None for p in self.padding):
            return None
        return torch.cat(
            [
                torch.zeros(r.expert_index.shape[0], r.expert_index.shape[2], dtype=torch.bool)
                if p is None
                else p
                for r, p in zip(self.routings, self.padding)
            ]
        )

    @property
    def prefix_tokens(self) -> int:
        """Leading tokens (cls, registers) that are not pooled into landmarks."""
        return self.layout.prefix_tokens

    def stats(self, *, padding_mask: torch.Tensor | None = None, empty: str = "skip") -> LayerStats:
        """:func:`mita.analysis.layer_stats` over every recorded batch (padding: the recorded mask unless
        ``padding_mask`` is given)."""
        r = self.routing()
        return layer_stats(
            r.expert_index,
            r.key_index,
            prefix_tokens=self.prefix_tokens,
            padding_mask=self.padding_mask() if padding_mask is None else padding_mask,
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
        self.layers = [LayerRecord(name, RoutingLayout.of(name, mod)) for name, mod in found]
        self._saved: list[bool] = []
        self._handles: list[Any] = []

    def _hook(self, index: int):
        record = self.layers[index]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            routing = getattr(module, "last_routing", None)
            if routing is None:  # e.g. a layer that ran without MiTA this time
                return
            if record.layout.layout == "grid":  # the grid may follow the input (e.g. dynamic image sizes)
                grid = _pair((getattr(module, "last_layout", None) or {}).get("grid")) or record.layout.grid
                if grid is None:
                    raise ValueError(f"layer {record.name!r} has a grid layout but reported no grid")
                if record.routings and grid != record.layout.grid:
                    raise ValueError(
                        f"layer {record.name!r} saw a {grid} grid after {record.layout.grid}; record inputs "
                        "of one size at a time"
                    )
                record.layout = dataclasses.replace(record.layout, grid=grid)
            # small ints keep many recorded batches cheap; positions fit easily in int32
            record.routings.append(Routing(*(t.detach().to(self.device, torch.int32) for t in routing)))
            mask = getattr(module, "last_key_padding_mask", None)
            record.padding.append(None if mask is None else mask.detach().to(self.device, torch.bool))

        return hook

    def __enter__(self) -> RoutingRecorder:
        self._saved = [mod.record_routing for mod in self._modules]
        for i, mod in enumerate(self._modules):
            mod.record_routing = True
            mod.last_routing = None
            mod.last_key_padding_mask = None
            self._handles.append(mod.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for mod, flag in zip(self._modules, self._saved):
            mod.record_routing = flag
            mod.last_routing = None
            mod.last_key_padding_mask = None

    def clear(self) -> None:
        """Forget what was recorded so far (the hooks stay on)."""
        for record in self.layers:
            record.routings.clear()
            record.padding.clear()

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
