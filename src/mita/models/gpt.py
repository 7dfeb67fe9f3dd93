"""``GPT``: a small pre-norm decoder-only language model (in the spirit of nanoGPT) with causal attention
kinds ``full`` | ``mita`` | ``moba`` | ``window`` (:mod:`mita.nn.causal`), RoPE and tied embeddings.

RoPE and MiTA: q and k are rotated *before* the mixer, so MiTA's landmarks (block means of the rotated
queries), its top-k key scores and its routing all see post-RoPE vectors. The op takes one q and one k, and
pre-RoPE routing would need a second copy of both in every backend and in the decoding cache. Post-RoPE
routing stays exactly causal, since each rotation depends only on its own token's position. Averaging 64
rotated queries cancels only the fastest-turning channel pairs (those with ``theta^(-2i/d) * b > 2 pi``, 5 of
16 pairs at ``d = 32``). The slower pairs keep the block's content, plus a mild bias towards keys near the
block. ``rope=None`` gives NoPE, with no positional signal at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.causal import CAUSAL_KINDS, CausalMixer, build_causal_mixer, filter_causal_kwargs
from ..nn.rope import apply_rope, rope_angles
from .blocks import Mlp, init_weights

__all__ = ["GPT", "GPTCache", "CausalSelfAttention", "build_gpt"]


class LayerCache:
    """One layer's decoding state: the mixer's cache and the absolute position of the next token."""

    def __init__(self, mixer: CausalMixer) -> None:
        self.inner = mixer.new_cache()
        self.pos = 0


class GPTCache:
    """A sequence batch's decoding state: one :class:`LayerCache` per layer, and the last embedding
    (for ``token_shift``)."""

    def __init__(self, model: GPT) -> None:
        self.layers = [LayerCache(blk.attn.mixer) for blk in model.blocks]
        self.last: torch.Tensor | None = None

    @property
    def pos(self) -> int:
        """Tokens seen so far."""
        return self.layers[0].pos


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` projection, RoPE on q/k, a causal mixer, ``proj``.

    Args:
        dim, num_heads: width and heads (``dim % num_heads == 0``).
        attention: a :data:`mita.nn.causal.CAUSAL_KINDS` kind; ``mixer_kw`` its options
            (``block_size``, ``topk``, ``landmark_horizon``, ``top_blocks``, ``backend``, ``router``), of
            which those of other kinds are dropped (:func:`mita.nn.causal.filter_causal_kwargs`).
        rope: RoPE theta (``None``: no rotary embedding).
        bias: biases in ``qkv`` and ``proj``.
    """

    def __init__(
        self, dim: int, num_heads: int, attention: str = "full", *, rope: float | None = 10000.0,
        bias: bool = False, dropout: float = 0.0, **mixer_kw: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        if rope is not None and (rope <= 0 or self.head_dim % 2):
            raise ValueError(
                f"rope needs a positive theta and an even head_dim, got {rope!r}, {self.head_dim}"
            )
        self.rope = rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.mixer = build_causal_mixer(attention, **filter_causal_kwargs(attention, mixer_kw))
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x`` [B, T, dim] -> [B, T, dim]. With ``cache``, ``x`` holds the next T tokens of the sequence."""
        b, t, _ = x.shape
        # [B, T, 3 dim] -> 3 x [B, H, T, d]
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None else cache.pos
        if self.rope is not None:
            pos = torch.arange(start, start + t, device=x.device).unsqueeze(1)  # [T, 1]
            angles = rope_angles(pos, self.head_dim, self.rope)
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        if cache is None:
            out = self.mixer(q, k, v)
        else:
            out = cache.inner.append(q, k, v)
            cache.pos += t
        out = out.transpose(1, 2).reshape(b, t, self.dim)  # [B, H, T, d] -> [B, T, dim]
        return self.drop(self.proj(out))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention: str, **kw: Any) -> None:
        super().__init__()
        dropout = kw.get("dropout", 0.0)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, attention, **kw)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only LM: token ids ``[B, T]`` -> next-token logits ``[B, T, vocab_size]``.

    Args:
        vocab_size: tokens (byte-level text: 256).
        max_len: the longest sequence (prompt + generated) it accepts.
        dim, depth, num_heads, mlp_ratio: shape.
        attention: ``"full"`` | ``"mita"`` | ``"moba"`` | ``"window"``.
        rope: RoPE theta, ``None`` for none (there are no learned positions).
        token_shift: add a learned projection of the previous token's embedding to each embedding (a
            causal convolution of width 2, as the short convolutions of Zoology's MQAR models): the
            "previous token" feature that induction heads otherwise spend a layer learning.
        dropout: after the embedding, in attention output and MLPs.
        attn_kw: the mixer's options (``block_size``, ``topk``, ``landmark_horizon``, ``top_blocks``,
            ``backend``, ``router``: how ``mita`` learns to route, default ``"gate+distill+select"``,
            ``"argmax"`` the router before it, and how ``moba``'s block gate learns, default ``"argmax"``,
            MoBA as published); options of other kinds are ignored, so one preset serves all kinds.

    The output head shares the token embedding's weight (tied embeddings).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        *,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        attention: str = "full",
        rope: float | None = 10000.0,
        token_shift: bool = False,
        dropout: float = 0.0,
        **attn_kw: Any,
    ) -> None:
        super().__init__()
        for name, val in (("vocab_size", vocab_size), ("max_len", max_len), ("dim", dim), ("depth", depth)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if attention not in CAUSAL_KINDS:
            raise ValueError(f"unknown causal attention kind {attention!r}; choose one of {CAUSAL_KINDS}")
        self.vocab_size, self.max_len, self.attention = vocab_size, max_len, attention
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.shift = nn.Linear(dim, dim, bias=False) if token_shift else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, mlp_ratio, attention, rope=rope, dropout=dropout, **attn_kw)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        self.head.weight = self.tok_embed.weight  # tied
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat in depth
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * depth) ** 0.5)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters not to decay: norms and biases (every 1-D parameter)."""
        return {name for name, p in self.named_parameters() if p.ndim < 2}

    def _check(self, idx: torch.Tensor, offset: int = 0) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            got = (idx.dtype, tuple(idx.shape)) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an integer tensor [B, T] of token ids, got {got}")
        if idx.shape[1] < 1:
            raise ValueError("idx must hold at least one token")
        if offset + idx.shape[1] > self.max_len:
            raise ValueError(f"sequence length {offset + idx.shape[1]} exceeds max_len={self.max_len}")

    def features(self, idx: torch.Tensor, cache: GPTCache | None = None) -> torch.Tensor:
        """The normalised last hidden states ``[B, T, dim]`` (``head`` of them gives the logits); losses
        on a few positions (MQAR's answers) can apply ``head`` to those rows only."""
        self._check(idx, 0 if cache is None else cache.pos)
        x = self.tok_embed(idx)  # [B, T, dim]
        if self.shift is not None:
            last = x[:, :1] * 0 if cache is None or cache.last is None else cache.last
            prev = torch.cat((last, x[:, :-1]), dim=1)  # [B, T, dim]: embedding of token t - 1 (0 at t = 0)
            if cache is not None:
                cache.last = x[:, -1:]
            x = x + self.shift(prev)
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache.layers[i])
        return self.norm(x)

    def forward(self, idx: torch.Tensor, cache: GPTCache | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` for ``idx`` ``[B, T]`` (with ``cache``: the next T tokens)."""
        return self.head(self.features(idx, cache))

    def new_cache(self) -> GPTCache:
        """An empty decoding state: per layer a ``MiTACache`` for mita, all keys/values for the others."""
        return GPTCache(self)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` ``[B, T]`` by ``max_new_tokens`` tokens -> ``[B, T + max_new_tokens]``.

        The prompt is prefilled in one call, then each token costs one cached step per layer.
        ``temperature == 0`` is greedy decoding; ``top_k`` keeps the k most likely tokens before sampling.

        Beyond the context (``max_len``), as nanoGPT's ``generate``: a longer prompt is cropped to its last
        ``max_len`` tokens, and when the cache is full the last ``3/4 max_len`` tokens are prefilled again
        into a fresh cache (one parallel call every ``max_len / 4`` tokens), so the model always sees
        between ``3/4 max_len`` and ``max_len`` tokens of context, at positions from 0.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        self._check(idx[:, -self.max_len :] if isinstance(idx, torch.Tensor) and idx.dim() == 2 else idx)
        keep = max(1, 3 * self.max_len // 4)
        out = idx
        if max_new_tokens == 0:
            return out
        cache = self.new_cache()
        logits = self(idx[:, -self.max_len :], cache)[:, -1].float()  # [B, V]
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            out = torch.cat((out, nxt), dim=1)
            if i + 1 == max_new_tokens:
                break
            if cache.pos >= self.max_len:  # full: slide the window, prefilled into a fresh cache
                cache = self.new_cache()
                logits = self(out[:, -keep:], cache)[:, -1].float()
            else:
                logits = self(nxt, cache)[:, -1].float()
        return out


def build_gpt(attention: str = "full", **kw: Any) -> GPT:
    """``GPT(**kw)`` with ``config`` set so :func:`mita.models.build_model` can rebuild it."""
    model = GPT(attention=attention, **kw)
    model.config = {"name": "gpt", "attention": attention, **kw}
    return model
