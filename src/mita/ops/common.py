"""What every backend shares: the validated :class:`Problem`, the :class:`Routing` it returns, the
landmark and query sides of SPEC §2 steps 1-3, and :class:`ExpertTiles` (expert-major packing).

Every backend calls :func:`landmark_side` and :func:`query_side`, so all make the same top-k and routing
choices on the same inputs (ties are broken by ``torch.topk`` everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Problem:
    """Validated sizes and options of one MiTA call (what every backend needs besides tensors)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    num_landmarks: int
    topk: int
    experts_per_query: int
    scale: float
    landmark_scale: float
    shared: bool
    routed: bool
    dedup: bool

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.heads // self.kv_heads


class Routing(NamedTuple):
    """What MiTA chose: ``expert_index`` [B, H, N, s] (each query's experts, best first) and
    ``key_index`` [B, H, m, k] (each landmark's top-k keys)."""

    expert_index: torch.Tensor
    key_index: torch.Tensor


def without_padding(
    k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` with padded rows zeroed: padding is excluded by selection, so a NaN/Inf there never
    meets a weight of 0 (``0 * NaN`` is NaN) in the products over every key, forward or backward."""
    if key_padding_mask is None:
        return k, v
    pad = key_padding_mask[:, None, :, None]
    return k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)


def landmark_side(
    p: Problem,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmark scores reused for top-k selection and shared values.

    Returns ``key_index`` [B, H, m, k] (top-k keys per landmark, padding never preferred) and
    ``values`` A = softmax(R K^T c) V as [B, H, m, dv].
    """
    b, h, m, d = landmarks.shape
    # GQA: the g query heads of one kv head are stacked so one matmul serves them all.
    r = landmarks.reshape(b, p.kv_heads, p.group * m, d)
    scores = (r @ k.transpose(-1, -2)) * p.scale  # [B, Hkv, g*m, N]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    key_index = scores.detach().topk(p.topk, dim=-1, sorted=False).indices
    values = torch.softmax(scores, dim=-1) @ v  # [B, Hkv, g*m, dv]
    return key_index.reshape(b, h, m, p.topk), values.reshape(b, h, m, v.shape[-1])


def query_side(p: Problem, q: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-landmark products reused for routing and shared logits.

    Returns ``qr`` = Q R^T [B, H, N, m] (unscaled) and ``expert_index`` [B, H, N, s].
    """
    qr = q @ landmarks.transpose(-1, -2)
    scores = qr.detach()
    if p.experts_per_query == 1:
        expert_index = scores.argmax(dim=-1, keepdim=True)  # cheaper than topk(1)
    else:
        expert_index = scores.topk(p.experts_per_query, dim=-1).indices
    return qr, expert_index


def default_tile_size(pairs_per_row: int, num_experts: int) -> int:
    """Largest power of two <= half the mean expert load, clamped to 8..64.

    Half the mean load bounds the padding of partly filled tiles (measured best on CPU at loads 8-256).
    """
    half_load = max(1, pairs_per_row // num_experts // 2)
    t = 8
    while t < 64 and 2 * t <= half_load:
        t *= 2
    return t


class ExpertTiles:
    """Static-size packing of G (query, expert) pairs into tiles of T pairs sharing one expert."""

    def __init__(self, expert_of_pair: torch.Tensor, num_experts: int, tile: int) -> None:
        g = expert_of_pair.numel()
        dev = expert_of_pair.device
        order = torch.argsort(expert_of_pair, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
        counts.index_add_(0, expert_of_pair, torch.ones_like(expert_of_pair))
        tiles_per = (counts + tile - 1) // tile
        tile_end = tiles_per.cumsum(0)
        tile_start = tile_end - tiles_per
        pair_start = counts.cumsum(0) - counts
        # sum_e ceil(c_e / T) <= (G + E (T - 1)) / T: a static bound on the number of tiles.
        n_tiles = (g + num_experts * (tile - 1)) // tile
        t = torch.arange(n_tiles, device=dev)
        self.expert = torch.searchsorted(tile_end, t, right=True).clamp_max(num_experts - 1)
        rank = (t - tile_start[self.expert]).unsqueeze(1) * tile + torch.arange(tile, device=dev)
        self.valid = rank < counts[self.expert].unsqueeze(1)  # [n_tiles, T]
        sorted_pos = (pair_start[self.expert].unsqueeze(1) + rank).clamp_max(g - 1)
        self.pair = order[sorted_pos]  # [n_tiles, T]: which pair sits in each slot
        # Inverse map: the flat slot of every pair, to read results back in pair order.
        rank_of_pair = torch.empty_like(order)
        rank_of_pair[order] = torch.arange(g, device=dev)
        local = rank_of_pair - pair_start[expert_of_pair]
        self.slot_of_pair = (tile_start[expert_of_pair] + local // tile) * tile + local % tile
        self.n_tiles, self.tile = n_tiles, tile


HALF = (torch.float16, torch.bfloat16)


def float32_if_half(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in float32 when the first is half precision, else unchanged: softmax statistics and
    long sums lose too much in float16/bfloat16 (and fp16 logits overflow past 65504)."""
    if tensors[0].dtype in HALF:
        return tuple(t.float() for t in tensors)
    return tensors


def sum_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """GQA: ``x`` [B, H, ...] holds one row per query head; sum each group of ``H / kv_heads`` heads, in a
    fixed order, into [B, kv_heads, ...]."""
    b, h = x.shape[:2]
    return x if h == kv_heads else x.reshape(b, kv_heads, h // kv_heads, *x.shape[2:]).sum(2)
