"""Tiny models that honour the routing-recording contract of ``mita.nn.MiTAAttention``, for tests that
must not depend on the model zoo."""

from __future__ import annotations

import torch
from torch import nn

import mita


class ToyMiTA(nn.Module):
    """Residual MiTA self-attention, landmarks pooled 1-D (``grid=None``) or 2-D after ``prefix`` tokens."""

    def __init__(self, dim: int, heads: int, m: int, k: int, *, grid=None, prefix: int = 0) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads, self.m, self.k, self.grid, self.prefix = heads, m, k, grid, prefix
        # what the recorder reads when it attaches, as mita.nn.MiTAAttention spells it
        self.layout = "seq" if grid is None else "grid"
        self.prefix_tokens, self.num_landmarks, self.landmark_mode = prefix, m, "pool"
        self.record_routing = False
        self.last_routing = None
        self.last_layout = None
        self.last_key_padding_mask = None

    def landmarks(self, q: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            return mita.landmarks.pool_1d(q[:, :, self.prefix :], self.m)
        side = int(self.m**0.5)
        return mita.landmarks.pool_2d(q, self.grid, (side, side), prefix=self.prefix)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out, routing = mita.mita_attention(
            q, k, v, self.landmarks(q), topk=self.k, key_padding_mask=key_padding_mask, return_routing=True
        )
        if self.record_routing:
            self.last_routing = mita.Routing(*(t.detach() for t in routing))
            self.last_key_padding_mask = key_padding_mask
            self.last_layout = {
                "layout": "seq" if self.grid is None else "grid",
                "grid": self.grid,
                "prefix_tokens": self.prefix,
                "num_landmarks": self.m,
            }
        return x + out.transpose(1, 2).reshape(b, n, c)


class ToyViT(nn.Module):
    """28x28 images, 4x4 patches (7x7 grid) + cls, two MiTA layers with m = 4, k = 6."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(*(ToyMiTA(dim, 2, 4, 6, grid=(7, 7), prefix=1) for _ in range(2)))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        return self.head(self.blocks(t)[:, 0])


class ToySeq(nn.Module):
    """Token sequences of length 24 (id 0 = padding, masked in attention), three MiTA layers with m = 3,
    k = 4, no prefix."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, dim)
        self.blocks = nn.ModuleList(ToyMiTA(dim, 2, 3, 4) for _ in range(3))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x == 0
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, pad)
        return self.head(h.mean(1))
