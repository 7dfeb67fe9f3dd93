"""``SequenceClassifier``: a 1-D transformer encoder for long token sequences (LRA-style tasks).

Token embedding + learned or sinusoidal positions, pre-norm blocks with any attention kind, padding-aware
mean pooling, and a linear head; with ``pair=True`` both inputs go through the same encoder and the head
classifies ``[a, b, a * b, a - b]`` (as LRA's retrieval task). MiTA runs in the ``"seq"`` layout without
prefix tokens (m = k = 16 by default, the paper's LRA setting); Agent uses m = 32 agents.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .blocks import Block, LayerNorm, init_weights

# The paper's LRA settings (SPEC §3): MiTA m = k = 16, Agent m = 32.
SEQ_ATTN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mita": {"num_landmarks": 16, "topk": 16},
    "agent": {"num_landmarks": 32},
}


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed ``[length, dim]`` sine/cosine position table of "Attention is all you need"."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


class SequenceClassifier(nn.Module):
    """Encoder classifier for ``[B, L]`` long token ids (or pairs of them with ``pair=True``).

    Args:
        vocab_size, num_classes, max_len: vocabulary, outputs and the longest accepted ``L``.
        dim, depth, num_heads, mlp_ratio: encoder shape.
        attention: any :mod:`mita.nn` kind; ``attn_kw`` override its settings (MiTA defaults m = k = 16).
        pair: classify pairs ``(tokens_a, tokens_b)`` with the shared encoder.
        pos: ``"learned"`` or ``"sinusoidal"`` positions.
        pad_id: padding token; padded keys are masked in attention and left out of the mean pooling.
        dropout: dropout after the embeddings and in the MLPs.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        *,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        attention: str = "mita",
        pair: bool = False,
        pos: str = "learned",
        pad_id: int = 0,
        dropout: float = 0.0,
        **attn_kw: Any,
    ) -> None:
        super().__init__()
        if pos not in ("learned", "sinusoidal"):
            raise ValueError(f"pos must be 'learned' or 'sinusoidal', got {pos!r}")
        for name, val in (("vocab_size", vocab_size), ("num_classes", num_classes), ("max_len", max_len)):
            if val < 1:
                raise ValueError(f"{name} must be positive, got {val}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary of size {vocab_size}")
        self.max_len, self.pad_id, self.pair = max_len, pad_id, pair
        self.embed = nn.Embedding(vocab_size, dim)
        if pos == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer(
                "pos_embed", sinusoidal_positions(max_len, dim).unsqueeze(0), persistent=False
            )
        self.drop = nn.Dropout(dropout)
        kw = {"layout": "seq", "prefix_tokens": 0, **SEQ_ATTN_DEFAULTS.get(attention, {}), **attn_kw}
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, attention=attention, drop=dropout, attn_kw=kw)
            for _ in range(depth)
        )
        self.norm = LayerNorm(dim)
        feat = 4 * dim if pair else dim
        self.head = (
            nn.Sequential(nn.Linear(feat, dim), nn.GELU(), nn.Linear(dim, num_classes))
            if pair
            else nn.Linear(feat, num_classes)
        )
        self.apply(init_weights)
        nn.init.normal_(self.embed.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW should not decay besides biases and norms (timm's hook)."""
        return {"pos_embed"}

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids -> ``[B, dim]`` mean of the encoded non-padding tokens."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"tokens must be an integer tensor [B, L], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        pad = tokens == self.pad_id
        x = self.drop(self.embed(tokens) + self.pos_embed[:, :length])
        for blk in self.blocks:
            x = blk(x, key_padding_mask=pad)
        x = self.norm(x)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)

    def forward(self, tokens: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for ``tokens`` ``[B, L]``, or for a pair ``(a, b)`` (``pair=True``)."""
        if not self.pair:
            if not isinstance(tokens, torch.Tensor):
                raise ValueError("pair=False expects one [B, L] tensor of token ids")
            return self.head(self.encode(tokens))
        if isinstance(tokens, torch.Tensor) or len(tokens) != 2:
            raise ValueError("pair=True expects a pair (tokens_a, tokens_b) of [B, L] tensors")
        a, b = self.encode(tokens[0]), self.encode(tokens[1])
        return self.head(torch.cat((a, b, a * b, a - b), dim=-1))


def build_sequence(attention: str = "mita", **kw: Any) -> SequenceClassifier:
    """``SequenceClassifier(**kw)`` with ``config`` set so :func:`mita.models.build_model` can rebuild it."""
    model = SequenceClassifier(attention=attention, **kw)
    model.config = {"name": "seq", "attention": attention, **kw}
    return model
