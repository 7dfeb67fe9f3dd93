"""Pooled landmarks of a sequence sharded across ranks: the windows of the whole sequence, not the shard's."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_gather, all_reduce_sum, group_rank

__all__ = ["pool_1d_sharded"]


def pool_1d_sharded(
    x: torch.Tensor, valid: torch.Tensor | None, m: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Adaptive average pooling of the whole sharded sequence into ``m`` windows, over its valid tokens.

    ``x`` is this rank's shard ``[B, H, n, d]`` and ``valid`` its ``[B, n]`` bool mask (None: all valid).
    Window ``j`` of a row with ``V`` valid tokens over all ranks holds the valid tokens of global rank
    ``floor(j V / m) .. ceil((j + 1) V / m) - 1``: the windows of :func:`mita.landmarks.pool_1d` (no
    padding) and of the MiTA module's padding-aware pooling. Returns all ``m`` landmarks ``[B, H, m, d]``
    on every rank (each rank's window sums are added over ranks, so the gradient reaches every shard).
    Communication: the valid counts (``B`` integers) and ``B H m d`` window sums, independent of N.
    """
    b, h, n, d = x.shape
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
    counts = all_gather(valid.sum(1), group, "landmark_counts")  # [P, B]
    rank = group_rank(group)
    before = counts[:rank].sum(0, keepdim=True).T  # [B, 1]: valid tokens on earlier ranks
    total = counts.sum(0).unsqueeze(1)  # [B, 1]
    pos = (before + valid.long().cumsum(1) - 1).masked_fill(~valid, -1)  # global rank among valid tokens
    j = torch.arange(m, device=x.device)
    start = torch.div(j * total, m, rounding_mode="floor")  # [B, m]
    end = -torch.div(-(j + 1) * total, m, rounding_mode="floor")
    weights = (pos[:, None, :] >= start[..., None]) & (pos[:, None, :] < end[..., None])
    weights = weights.to(x.dtype) / (end - start).clamp_min(1).unsqueeze(-1).to(x.dtype)  # [B, m, n]
    return all_reduce_sum(weights[:, None] @ x, group, "landmark_sums")
