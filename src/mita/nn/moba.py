"""``MoBAAttention``: mixture of block attention, non-causal (MoBA, Lu et al., 2025).

Keys are cut into contiguous blocks of ``block_size`` tokens (the last block may be shorter). Each block
is scored by its mean-pooled key (over its non-padding keys); each query attends, in one softmax, to all
keys of its ``top_blocks`` best-scoring blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import AttentionBase, config_of
from .layout import TokenLayout


class MoBAAttention(AttentionBase):
    """MoBA with rigid blocks and top-s block routing by ``q . mean(K_block)``; no causal mask.

    Args (beyond :class:`mita.nn.base.AttentionBase`):
        block_size: n, keys per block.
        top_blocks: s, blocks each query attends to (at most the number of blocks).
        chunk_size: queries processed at once (bounds memory to ``chunk_size * s * n`` keys).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, *, block_size: int = 16, top_blocks: int = 3,
        chunk_size: int = 1024, **kw: Any,
    ) -> None:  # fmt: skip
        cfg = config_of(locals())
        super().__init__(dim, num_heads, **kw)
        for name, val in (("block_size", block_size), ("top_blocks", top_blocks), ("chunk_size", chunk_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.block_size, self.top_blocks, self.chunk_size = block_size, top_blocks, chunk_size
        self.config = cfg

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: TokenLayout
    ) -> torch.Tensor:
        b, h, n, d = q.shape
        bs = self.block_size
        nb = -(-n // bs)
        if self.top_blocks > nb:
            raise ValueError(f"top_blocks={self.top_blocks} exceeds the {nb} blocks of size {bs} in N={n}")
        pad = nb * bs - n
        # Token validity including the tail padding of the last block.
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else ~mask
        valid = F.pad(valid, (0, pad), value=False).reshape(b, 1, nb, bs, 1)
        kb = F.pad(k, (0, 0, 0, pad)).reshape(b, h, nb, bs, d)
        vb = F.pad(v, (0, 0, 0, pad)).reshape(b, h, nb, bs, v.shape[-1])
        count = valid.sum(3)  # [B, 1, nb, 1]
        mean_k = (kb * valid).sum(3) / count.clamp_min(1)  # [B, H, nb, d]
        empty = (count == 0).reshape(b, 1, 1, nb)
        outs = []
        for start in range(0, n, self.chunk_size):
            qc = q[:, :, start : start + self.chunk_size]
            c = qc.shape[2]
            scores = (qc @ mean_k.transpose(-1, -2)).masked_fill(empty, float("-inf"))  # [B, H, c, nb]
            blocks = scores.detach().topk(self.top_blocks, dim=-1).indices  # [B, H, c, s]
            flat = blocks.reshape(b, h, c * self.top_blocks)
            keys = kb.gather(2, flat[..., None, None].expand(-1, -1, -1, bs, d))
            vals = vb.gather(2, flat[..., None, None].expand(-1, -1, -1, bs, vb.shape[-1]))
            ok = valid.expand(-1, h, -1, -1, -1).gather(2, flat[..., None, None].expand(-1, -1, -1, bs, 1))
            keys = keys.reshape(b, h, c, self.top_blocks * bs, d)
            vals = vals.reshape(b, h, c, self.top_blocks * bs, -1)
            logits = torch.einsum("bhcd,bhcjd->bhcj", qc, keys) * self.scale
            logits = logits.masked_fill(~ok.reshape(b, h, c, -1), float("-inf"))
            weights = self.attn_drop(logits.softmax(-1))
            outs.append(torch.einsum("bhcj,bhcje->bhce", weights, vals))
        return torch.cat(outs, dim=2)
