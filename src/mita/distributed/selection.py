"""Deterministic top-k: larger score first, and among equal scores the lower index first.

The single-process CPU kernel breaks top-k ties the same way (lower key index), while ``torch.topk``'s
choice among ties is unspecified. A rule that depends only on (score, global index) lets every rank
select the same keys from merged per-rank candidates, whatever order they arrive in.
"""

from __future__ import annotations

import torch

__all__ = ["topk_lowest_index", "merge_candidates"]


def _take_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask with exactly ``k`` True per row: the ``k`` largest, ties to the lower position."""
    kth = x.topk(k, dim=-1).values[..., -1:]  # the k-th largest value of each row
    above = x > kth
    need = k - above.sum(-1, keepdim=True)
    tied = x == kth
    return above | (tied & (tied.cumsum(-1) <= need))


def _positions(take: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` True entries of each row of ``take``, in increasing order (no host sync)."""
    n = take.shape[-1]
    slot = torch.where(take, take.cumsum(-1) - 1, k)  # the unselected go to a spare slot k
    pos = torch.arange(n, device=take.device).expand_as(take)
    out = torch.zeros((*take.shape[:-1], k + 1), dtype=torch.long, device=take.device)
    return out.scatter_(-1, slot, pos)[..., :k]


def topk_lowest_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries of each row of ``x`` (last dim), ties to the
    lower index; the entries come in increasing index order. NaN is not supported.

    ``torch.topk`` gives the right set unless a value equal to its k-th spills outside it; only such rows
    (rare with real-valued data; one host sync to find them) take the exact, slower path."""
    vals, idx = x.topk(k, dim=-1)  # descending
    kth = vals[..., -1:]
    spill = (x == kth).sum(-1) != (vals == kth).sum(-1)
    if bool(spill.any()):
        idx = idx.clone()
        rows = x[spill]  # [R, n]
        idx[spill] = _take_mask(rows, k).nonzero()[:, -1].reshape(-1, k)  # exactly k per row, ascending
    idx = idx.sort(dim=-1).values
    return x.gather(-1, idx), idx


def merge_candidates(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of candidate ``(values, index)`` rows (last dim; indices distinct within a row), by
    value descending then index ascending; returned in increasing index order."""
    order = index.argsort(dim=-1)
    values, index = values.gather(-1, order), index.gather(-1, order)
    pos = _positions(_take_mask(values, k), k)
    return values.gather(-1, pos), index.gather(-1, pos)
