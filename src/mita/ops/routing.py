"""The discrete choices and landmark-side quantities every backend shares (SPEC §2 steps 1-3).

Both the reference and the torch backend call these, so they make the same top-k and routing
choices on the same inputs (ties are broken by ``torch.topk`` in both).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .checks import Problem


class Routing(NamedTuple):
    """What MiTA chose: ``expert_index`` [B, H, N, s] (each query's experts, best first) and
    ``key_index`` [B, H, m, k] (each landmark's top-k keys)."""

    expert_index: torch.Tensor
    key_index: torch.Tensor


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
