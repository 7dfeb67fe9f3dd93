"""``TopKAttention``: each query attends to its own top-k keys (N private experts)."""

from __future__ import annotations

from typing import Any

import torch

from .base import AttentionBase, config_of
from .layout import TokenLayout


class TopKAttention(AttentionBase):
    """``out_i = softmax_{j in T_i}(q_i . k_j / sqrt(d)) v_j`` with ``T_i = topk_k(q_i K^T)``.

    Scores are computed in chunks of ``chunk_size`` queries, so memory is O(chunk_size * N), never N x N
    at once. Padded keys are never selected. Takes every :class:`mita.nn.base.AttentionBase` option.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, *, topk: int = 25, chunk_size: int = 1024, **kw: Any
    ) -> None:
        cfg = config_of(locals())
        super().__init__(dim, num_heads, **kw)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        self.topk, self.chunk_size = topk, chunk_size
        self.config = cfg

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: TokenLayout
    ) -> torch.Tensor:
        b, h, n, d = q.shape
        if self.topk > n:
            raise ValueError(f"topk={self.topk} exceeds the sequence length N={n}")
        outs = []
        for start in range(0, n, self.chunk_size):
            qc = q[:, :, start : start + self.chunk_size]
            logits = (qc @ k.transpose(-1, -2)) * self.scale  # [B, H, c, N]
            if mask is not None:
                logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
            top, idx = logits.topk(self.topk, dim=-1)
            weights = self.attn_drop(top.softmax(-1))  # padded picks (rows with < k real keys) get 0
            c = idx.shape[2]
            vals = v.gather(2, idx.reshape(b, h, c * self.topk, 1).expand(-1, -1, -1, v.shape[-1]))
            outs.append((weights.unsqueeze(-2) @ vals.reshape(b, h, c, self.topk, -1)).squeeze(-2))
        return torch.cat(outs, dim=2)
