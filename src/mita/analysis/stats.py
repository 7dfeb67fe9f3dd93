"""Routing statistics: token pruning, expert load and key/query overlap (SPEC §3, paper Figs. 4-5).

Every function takes the index tensors of a :class:`mita.Routing` for one attention layer of a
self-attention model (queries and keys are the same ``N`` tokens):

- ``key_index`` ``[B, H, m, k]``: the top-k key positions chosen by each landmark (unique per landmark);
- ``expert_index`` ``[B, H, N, s]``: the experts (landmarks) each query is routed to.

Definitions (all per batch element ``b`` and head ``h``):

- *selected tokens*: positions that at least one landmark of the head picks as a key; the *pruned
  fraction* is the share of non-prefix, non-padding tokens that no landmark picks. ``union_heads`` asks
  instead for tokens picked by no landmark of *any* head (the paper's Fig. 4 aggregates over heads).
- *expert load*: the number of (non-padding) queries routed to each expert; with ``s > 1`` a query
  counts once for each of its experts. Entropy is of the load distribution ``load / sum(load)`` in nats.
- *IoU of expert j*: ``|T_j ∩ Q_j| / |T_j ∪ Q_j|`` where ``T_j`` are the positions of its keys and
  ``Q_j`` the positions of the queries routed to it. ``T_j`` is never empty, so the IoU is always
  defined; an *empty* expert (``Q_j = ∅``) has IoU 0. Averages skip empty experts by default
  (``empty="skip"``: an expert that serves no query does no routed work), ``empty="zero"`` counts them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = [
    "selection_counts",
    "pruned_fraction",
    "expert_load",
    "load_entropy",
    "expert_iou",
    "LayerStats",
    "layer_stats",
]


def _check_routing(expert_index: torch.Tensor, key_index: torch.Tensor) -> tuple[int, int, int, int]:
    if expert_index.dim() != 4 or key_index.dim() != 4:
        raise ValueError(
            f"expert_index must be [B, H, N, s] and key_index [B, H, m, k], got shapes "
            f"{tuple(expert_index.shape)} and {tuple(key_index.shape)}"
        )
    if expert_index.shape[:2] != key_index.shape[:2]:
        raise ValueError(
            f"expert_index {tuple(expert_index.shape)} and key_index {tuple(key_index.shape)} "
            "disagree in [B, H]"
        )
    b, h, n, _ = expert_index.shape
    return b, h, n, key_index.shape[2]


def _token_mask(
    batch: int, n: int, prefix_tokens: int, padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """``[B, N]`` bool: True for tokens the statistics count (not prefix, not padding)."""
    if not 0 <= prefix_tokens < n:
        raise ValueError(f"prefix_tokens={prefix_tokens} must be in 0..N-1 with N={n}")
    keep = torch.ones(batch, n, dtype=torch.bool, device=device)
    keep[:, :prefix_tokens] = False
    if padding_mask is not None:
        if tuple(padding_mask.shape) != (batch, n):
            raise ValueError(f"padding_mask must be [B, N] = [{batch}, {n}], got {tuple(padding_mask.shape)}")
        keep &= ~padding_mask.to(device=device, dtype=torch.bool)
    return keep


def selection_counts(key_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """How many landmarks select each token as a key: ``[B, H, m, k] -> [B, H, N]`` (int64).

    Sum over heads for the paper's "aggregated over heads" maps.
    """
    if key_index.dim() != 4:
        raise ValueError(f"key_index must be [B, H, m, k], got shape {tuple(key_index.shape)}")
    if key_index.numel() and int(key_index.max()) >= num_tokens:
        raise ValueError(f"key_index holds position {int(key_index.max())} >= num_tokens={num_tokens}")
    b, h = key_index.shape[:2]
    counts = torch.zeros(b, h, num_tokens, dtype=torch.int64, device=key_index.device)
    flat = key_index.reshape(b, h, -1).long()
    return counts.scatter_add_(-1, flat, torch.ones_like(flat))


def pruned_fraction(
    key_index: torch.Tensor,
    num_tokens: int,
    *,
    prefix_tokens: int = 0,
    padding_mask: torch.Tensor | None = None,
    union_heads: bool = False,
) -> torch.Tensor:
    """Fraction of counted tokens (not prefix, not padding) that no landmark selects.

    Returns ``[B, H]`` (per head), or ``[B]`` with ``union_heads=True`` (a token counts as selected when
    any landmark of any head picks it).
    """
    counts = selection_counts(key_index, num_tokens)
    keep = _token_mask(counts.shape[0], num_tokens, prefix_tokens, padding_mask, counts.device)
    unselected = counts == 0  # [B, H, N]
    if union_heads:
        unselected = unselected.all(dim=1)  # [B, N]
        return (unselected & keep).sum(-1) / keep.sum(-1).clamp_min(1)
    return (unselected & keep[:, None]).sum(-1) / keep.sum(-1, keepdim=True).clamp_min(1)


def expert_load(
    expert_index: torch.Tensor, num_experts: int, *, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Queries routed to each expert: ``[B, H, N, s] -> [B, H, m]`` (float, padding queries not counted)."""
    if expert_index.dim() != 4:
        raise ValueError(f"expert_index must be [B, H, N, s], got shape {tuple(expert_index.shape)}")
    b, h, n, s = expert_index.shape
    if expert_index.numel() and int(expert_index.max()) >= num_experts:
        raise ValueError(f"expert_index holds expert {int(expert_index.max())} >= num_experts={num_experts}")
    weight = torch.ones(b, 1, n, s, device=expert_index.device)
    if padding_mask is not None:
        keep = _token_mask(b, n, 0, padding_mask, expert_index.device)
        weight = weight * keep[:, None, :, None]
    load = torch.zeros(b, h, num_experts, device=expert_index.device)
    index = expert_index.reshape(b, h, -1).long()
    return load.scatter_add_(-1, index, weight.expand(b, h, n, s).reshape(b, h, -1))


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the load distribution over the last dimension; ``0 log 0 = 0``.

    ``log(m)`` for a perfectly balanced load, 0 when one expert takes every query.
    """
    p = load / load.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def expert_iou(
    expert_index: torch.Tensor, key_index: torch.Tensor, *, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """IoU between each expert's key positions and its routed query positions: ``[B, H, m]``.

    Empty experts get 0 (see the module docstring); use :func:`expert_load` to tell them apart.
    """
    b, h, n, m = _check_routing(expert_index, key_index)
    if key_index.numel() and int(key_index.max()) >= n:
        raise ValueError(
            f"key_index holds position {int(key_index.max())} but there are N={n} queries; the overlap "
            "needs self-attention (queries and keys are the same tokens)"
        )
    keys = torch.zeros(b, h, m, n, dtype=torch.bool, device=key_index.device)
    keys.scatter_(-1, key_index.long(), True)
    queries = torch.zeros(b, h, n, m, dtype=torch.bool, device=key_index.device)
    queries.scatter_(-1, expert_index.long(), True)
    if padding_mask is not None:
        queries &= _token_mask(b, n, 0, padding_mask, queries.device)[:, None, :, None]
    queries = queries.transpose(-1, -2)  # [B, H, m, N]
    inter = (keys & queries).sum(-1)
    union = (keys | queries).sum(-1)  # >= k >= 1: never zero
    return inter / union


@dataclass
class LayerStats:
    """Summary of one layer's routing over a set of samples (floats; JSON-friendly via ``asdict``).

    ``pruned`` and the load figures are means over samples and heads; ``pruned_all_heads`` is the mean
    over samples of the fraction selected by no head. ``load_*`` are per (sample, head) min/mean/max over
    experts, then averaged; ``load_entropy_norm`` divides by ``log m`` (1 = balanced). ``iou_mean`` averages
    over the experts of each (sample, head), then over heads and samples; ``iou_min``/``iou_max`` are the
    extremes over single experts, ``iou_head_min``/``iou_head_max`` those of the per-(sample, head)
    means (the paper's Fig. 5 band). ``empty_experts`` is the mean fraction of experts that serve no query.
    """

    num_tokens: int
    num_landmarks: int
    topk: int
    experts_per_query: int
    prefix_tokens: int
    pruned: float
    pruned_all_heads: float
    load_min: float
    load_mean: float
    load_max: float
    load_entropy: float
    load_entropy_norm: float
    empty_experts: float
    iou_mean: float
    iou_min: float
    iou_max: float
    iou_head_min: float
    iou_head_max: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (for JSON)."""
        return asdict(self)


def layer_stats(
    expert_index: torch.Tensor,
    key_index: torch.Tensor,
    *,
    prefix_tokens: int = 0,
    padding_mask: torch.Tensor | None = None,
    empty: str = "skip",
) -> LayerStats:
    """All statistics of one layer's routing (see the module docstring for the definitions).

    Args:
        expert_index, key_index: a layer's :class:`mita.Routing` tensors, batches concatenated on dim 0.
        prefix_tokens: leading tokens (cls, registers) left out of the pruned fraction.
        padding_mask: ``[B, N]`` bool, True = padding: such tokens are neither counted as prunable nor as
            routed queries.
        empty: ``"skip"`` (default) leaves experts with no routed query out of the IoU averages,
            ``"zero"`` counts them as IoU 0.
    """
    if empty not in ("skip", "zero"):
        raise ValueError(f"empty must be 'skip' or 'zero', got {empty!r}")
    b, h, n, m = _check_routing(expert_index, key_index)
    expert_index = expert_index.long()
    key_index = key_index.long()
    per_head = pruned_fraction(key_index, n, prefix_tokens=prefix_tokens, padding_mask=padding_mask)
    all_heads = pruned_fraction(
        key_index, n, prefix_tokens=prefix_tokens, padding_mask=padding_mask, union_heads=True
    )
    load = expert_load(expert_index, m, padding_mask=padding_mask)
    ent = load_entropy(load)
    iou = expert_iou(expert_index, key_index, padding_mask=padding_mask)
    used = load > 0 if empty == "skip" else torch.ones_like(load, dtype=torch.bool)
    iou_used = iou[used]
    # per-head mean over the experts that count; a head always routes its queries somewhere
    head_mean = (iou * used).sum(-1) / used.sum(-1).clamp_min(1)
    return LayerStats(
        num_tokens=n,
        num_landmarks=m,
        topk=key_index.shape[-1],
        experts_per_query=expert_index.shape[-1],
        prefix_tokens=prefix_tokens,
        pruned=float(per_head.mean()),
        pruned_all_heads=float(all_heads.mean()),
        load_min=float(load.amin(-1).mean()),
        load_mean=float(load.mean(-1).mean()),
        load_max=float(load.amax(-1).mean()),
        load_entropy=float(ent.mean()),
        load_entropy_norm=float(ent.mean() / torch.log(torch.tensor(float(m)))) if m > 1 else 1.0,
        empty_experts=float((load == 0).float().mean()),
        iou_mean=float(head_mean.mean()),
        iou_min=float(iou_used.min()) if iou_used.numel() else float("nan"),
        iou_max=float(iou_used.max()) if iou_used.numel() else float("nan"),
        iou_head_min=float(head_mean.min()),
        iou_head_max=float(head_mean.max()),
    )
