"""Context-parallel training of :class:`mita.models.sequence.SequenceClassifier`.

:class:`ContextParallelSequence` runs each sequence of a batch across the ranks of a process group: every
rank embeds its contiguous shard of the tokens, runs the encoder blocks on it (per-token layers locally,
MiTA through :func:`context_parallel_attention` with landmarks pooled over the whole sequence), and the
padding-aware mean over all shards feeds the head, so every rank of the group returns the logits of the
whole batch. Wrapped in ``DistributedDataParallel`` over all ranks (context-parallel groups of consecutive
ranks, data parallel across groups), the averaged gradient is the data-parallel average of the
single-process gradients: the encoder's gradients on the ranks of a group add up to ``P`` times the
sequence's gradient and the head's are ``P`` equal copies, and DDP divides by ``P`` times the number of
groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..models.sequence import SequenceClassifier
from ..nn.mita import MiTAAttention
from .attention import context_parallel_attention
from .collectives import all_reduce_sum, group_rank, group_size
from .common import shard_sequence
from .landmarks import pool_1d_sharded

__all__ = ["ContextParallelSequence", "check_context_parallel_model"]


def check_context_parallel_model(model: nn.Module, world: int) -> None:
    """ValueError unless ``model`` can run context-parallel over ``world`` ranks: a SequenceClassifier
    whose attention layers are all non-causal MiTA with pooled landmarks, ``m`` a multiple of ``world``."""
    if not isinstance(model, SequenceClassifier):
        raise ValueError(f"context parallelism runs the sequence classifier, not {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        if not isinstance(attn, MiTAAttention):
            raise ValueError(f"context parallelism needs MiTA attention; block {i} has {type(attn).__name__}")
        why = None
        if attn.landmark_mode != "pool":
            why = f"landmark_mode={attn.landmark_mode!r} (only 'pool')"
        elif attn.rope_theta is not None:
            why = "rotary positions"
        elif attn.dwc is not None:
            why = "dwc"
        elif attn.num_landmarks % world:
            why = f"num_landmarks={attn.num_landmarks}, not a multiple of the {world} ranks"
        if why:
            raise ValueError(f"context parallelism does not support MiTA with {why} (block {i})")


def _attend(module: MiTAAttention, group: dist.ProcessGroup | None):
    """A replacement for ``module.attend`` on this rank's shard."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: Any):
        world, rank = group_size(group), group_rank(group)
        m_local = module.num_landmarks // world
        valid = None if mask is None else ~mask
        r = pool_1d_sharded(q, valid, module.num_landmarks, group)[
            :, :, rank * m_local : (rank + 1) * m_local
        ]
        return context_parallel_attention(
            q, k, v, r, topk=module.topk, group=group, experts_per_query=module.experts_per_query,
            landmark_scale=module.landmark_scale, shared=module.shared, routed=module.routed,
            dedup=module.dedup, key_padding_mask=mask,
        )  # fmt: skip

    return attend


class ContextParallelSequence(nn.Module):
    """``model`` (a :class:`SequenceClassifier`) with each sequence split across the ranks of ``group``.

    Every rank of the group passes the same whole batch ``[B, L]`` (``L`` a multiple of the group size)
    and gets the logits of the whole batch; the work on the tokens is split. The wrapped model keeps its
    parameters (``.model``), so its checkpoints and single-process evaluation are unchanged.
    """

    def __init__(self, model: SequenceClassifier, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        check_context_parallel_model(model, group_size(group))
        self.model, self.group = model, group

    @contextlib.contextmanager
    def _sharded_attention(self) -> Iterator[None]:
        mods = [blk.attn for blk in self.model.blocks]
        for mod in mods:
            mod.attend = _attend(mod, self.group)  # an instance attribute: shadows the method
        try:
            yield
        finally:
            for mod in mods:
                del mod.attend

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids (the whole sequences) -> ``[B, dim]``, as ``SequenceClassifier.encode``."""
        model = self.model
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"tokens must be an integer tensor [B, L], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        length = tokens.shape[1]
        if length > model.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={model.max_len}")
        local = shard_sequence(tokens, 1, self.group)
        start = group_rank(self.group) * local.shape[1]
        pad = local == model.pad_id
        x = model.drop(model.embed(local) + model.pos_embed[:, start : start + local.shape[1]])
        with self._sharded_attention():
            for blk in model.blocks:
                x = blk(x, key_padding_mask=pad)
        x = model.norm(x)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        sums = all_reduce_sum(torch.cat([(x * keep).sum(1), keep.sum(1)], dim=1), self.group, "pooling")
        return sums[:, :-1] / sums[:, -1:].clamp_min(1.0)

    def forward(self, tokens: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of the whole batch, on every rank of the group."""
        model = self.model
        if not model.pair:
            if not isinstance(tokens, torch.Tensor):
                raise ValueError("pair=False expects one [B, L] tensor of token ids")
            return model.head(self.encode(tokens))
        if isinstance(tokens, torch.Tensor) or len(tokens) != 2:
            raise ValueError("pair=True expects a pair (tokens_a, tokens_b) of [B, L] tensors")
        a, b = self.encode(tokens[0]), self.encode(tokens[1])
        return model.head(torch.cat((a, b, a * b, a - b), dim=-1))
