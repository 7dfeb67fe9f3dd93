"""Causal token mixers for decoders, behind one registry: ``full``, ``mita``, ``moba``, ``window``.

A mixer maps head-split ``q, k, v`` ``[B, H, N, d]`` (already projected and rotated) to ``[B, H, N, d]``
with output ``i`` depending on tokens ``<= i`` only, and makes a decoding cache (:meth:`new_cache`)
whose ``append(q, k, v)`` returns the outputs of ``T >= 1`` new tokens given everything appended so far.
Query ``i`` sits in block ``beta(i) = i // block_size``.

- ``full``: exact causal softmax attention (``F.scaled_dot_product_attention(is_causal=True)``).
- ``mita``: causal MiTA (SPEC §5) through :func:`mita.mita_causal_attention`, landmarks the block means
  of the queries; decoding with :class:`mita.MiTACache`.
- ``moba``: causal MoBA (Lu et al., 2025): block gate keys are the mean keys of complete blocks; query
  ``i`` attends, in one softmax, to its own block causally (always on) and to the ``top_blocks`` past
  blocks ``j < beta(i)`` with the highest ``q_i . mean(K_j)``; blocks ``>= beta(i)`` are masked with
  ``-inf`` *before* the top-s choice, so a future block can never push a past one out. Its gate can be
  trained as causal MiTA's router is (``router=``: straight-through gate, routing distillation).
- ``window``: own block (causally) and the previous block only: the no-retrieval floor at the same
  block size.

Budgets per query (keys in the softmax): full ``i + 1``; mita ``beta + s topk + (i mod b) + 1``
(landmarks, ``s = experts_per_query`` routed experts of ``topk`` keys, own block); moba
``top_blocks * b + (i mod b) + 1``; window ``b + (i mod b) + 1``. ``moba`` with
``top_blocks * block_size == topk`` is MiTA's matched budget (``s = 1``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..landmarks import block_mean
from ..ops import MiTACache, mita_causal_attention
from ..ops.arguments import as_bool, as_horizon, as_int, as_weight
from .causal_router import attach_loss, block_distillation_loss, routing_distillation_loss
from .registry import check_kwargs

__all__ = [
    "CAUSAL_KINDS",
    "CausalMixer",
    "FullCausal",
    "MiTACausal",
    "ROUTERS",
    "MOBA_ROUTERS",
    "MoBACausal",
    "WindowCausal",
    "DenseCache",
    "build_causal_mixer",
    "filter_causal_kwargs",
]


def _positive_int(name: str, val: Any) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    return val


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [B, H, N, d] with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )


class CausalMixer(nn.Module):
    """Base of the causal mixers: :meth:`forward` over a whole sequence, :meth:`new_cache` for decoding."""

    kind = ""
    # [B, N] bool while :func:`mita.nn.causal_router.objective_rows` is active: the rows the training
    # objective reads, where a learned router's distillation draws its queries.
    objective_rows: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self) -> Any:
        """An empty decoding cache with ``append(q, k, v) -> out`` (one per layer and sequence batch)."""
        return DenseCache(self)

    def allowed(self, q_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, H, T, L]`` (or broadcastable) mask: which cached keys each new query may attend to.

        ``q`` holds the new queries at absolute positions ``q_pos`` ``[T]``; ``k`` all keys ``0..L-1``.
        """
        raise NotImplementedError


class DenseCache:
    """Decoding cache keeping every key and value; new queries attend through :meth:`CausalMixer.allowed`.

    Exact for ``full`` and ``window``, and for ``moba`` (which re-scores the complete blocks each step: its
    reference code has no sparse decode either). ``append`` accepts any chunk length ``T >= 1``.
    """

    def __init__(self, mixer: CausalMixer) -> None:
        self.mixer = mixer
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens appended so far."""
        return 0 if self.k is None else self.k.shape[2]

    def append(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Add ``T`` new tokens ``[B, H, T, d]``; return their outputs ``[B, H, T, d]``."""
        _check_qkv(q, k, v)
        start = self.length
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        q_pos = torch.arange(start, start + q.shape[2], device=q.device)
        keep = self.mixer.allowed(q_pos, q, self.k)  # True = take part (SDPA's convention)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=keep)


class FullCausal(CausalMixer):
    """Exact causal softmax attention."""

    kind = "full"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_qkv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def allowed(self, q_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k_pos = torch.arange(k.shape[2], device=k.device)
        return k_pos[None, :] <= q_pos[:, None]  # [T, L]


class WindowCausal(CausalMixer):
    """Own block (causal) plus the whole previous block: keys ``(beta(i) - 1) * b <= t <= i``.

    The parallel form works block by block (``[N, 2b]`` logits, never ``N x N``).
    """

    kind = "window"

    def __init__(self, block_size: int = 64) -> None:
        super().__init__()
        self.block_size = _positive_int("block_size", block_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_qkv(q, k, v)
        b, h, n, d = q.shape
        bs = self.block_size
        nb = -(-n // bs)
        pad = nb * bs - n

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, H, N, e] -> [B, H, nb, bs, e]
            return F.pad(t, (0, 0, 0, pad)).reshape(b, h, nb, bs, t.shape[-1])

        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        # keys of block j: block j-1 then block j -> [B, H, nb, 2 bs, e] (block -1 is zeros, masked below)
        kk = torch.cat((F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb), dim=3)
        vv = torch.cat((F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb), dim=3)
        i = torch.arange(bs, device=q.device)
        own = i[None, :] <= i[:, None]  # [bs, bs] causal inside the block
        prev = torch.ones(nb, bs, bs, dtype=torch.bool, device=q.device)
        prev[0] = False  # the first block has no previous block
        keep = torch.cat((prev, own.expand(nb, bs, bs)), dim=2)  # [nb, bs, 2 bs]
        out = F.scaled_dot_product_attention(
            qb.reshape(b, h * nb, bs, d), kk.reshape(b, h * nb, 2 * bs, d),
            vv.reshape(b, h * nb, 2 * bs, -1), attn_mask=keep.repeat(h, 1, 1),
        )  # fmt: skip
        return out.reshape(b, h, nb * bs, -1)[:, :, :n]

    def allowed(self, q_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k_pos = torch.arange(k.shape[2], device=k.device)
        lo = (q_pos // self.block_size - 1) * self.block_size
        return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= lo[:, None])


#: How MoBA's block gate learns (``MoBACausal(router=...)``).
MOBA_ROUTERS = ("argmax", "gate", "distill", "gate+distill")


class MoBACausal(CausalMixer):
    """Causal MoBA: own block forced and causal, plus ``top_blocks`` past complete blocks by mean key.

    Written densely (an ``[N, N]`` mask per head, like MoBA's ``moba_naive``): a baseline for accuracy,
    not for speed. Queries with fewer than ``top_blocks`` past blocks take all of them.

    Args:
        block_size: b.
        top_blocks: past blocks each query attends to.
        router: how the block gate ``top_blocks`` of ``q_i . mean(K_j)`` learns (:data:`MOBA_ROUTERS`;
            docs/causal.md, "MoBA with the same router training"), causal MiTA's technique with the
            gate scores as router logits: ``pi_i = softmax_{j < beta(i)} (q_i . mean(K_j))`` (MoBA's
            unscaled scores). ``"gate"``: in training, ``log pi_i(j) - sg(log pi_i(j))`` (zero in value:
            outputs unchanged bit for bit) is added to the logits of the keys of each selected block
            ``j``, so the gate is credited with its keys' gradient. ``"distill"``: in training, the
            routing distillation loss of :func:`mita.nn.causal_router.block_distillation_loss` (dense
            attention's mass per visible block as the target of ``pi_i``) on ``distill_queries`` queries
            per sequence, weight ``distill_weight``, attached to the output rows. ``"gate+distill"``:
            both (it lifts MQAR at N = 512 from 44 / 51 % to 93 / 86 %, docs/causal.md, at 2.6x the
            layer's training cost). ``"argmax"`` (default): MoBA as published, the gate gets no gradient,
            so the ``moba`` kind stays the published baseline.
        distill_weight, distill_queries: the distillation loss's weight and sampled queries per sequence.
    """

    kind = "moba"
    #: The gate scores' factor in ``pi_i`` (MoBA scores blocks by the raw ``q . mean(K)``).
    gate_scale = 1.0

    def __init__(
        self,
        block_size: int = 64,
        top_blocks: int = 1,
        router: str = "argmax",
        distill_weight: float = 1.0,
        distill_queries: int = 32,
    ) -> None:
        super().__init__()
        self.block_size = _positive_int("block_size", block_size)
        self.top_blocks = _positive_int("top_blocks", top_blocks)
        if router not in MOBA_ROUTERS:
            raise ValueError(f"router must be one of {MOBA_ROUTERS} for moba, got {router!r}")
        self.router = router
        self.distill_weight = as_weight("distill_weight", distill_weight)
        self.distill_queries = _positive_int("distill_queries", distill_queries)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_qkv(q, k, v)
        q_pos = torch.arange(q.shape[2], device=q.device)
        learn = self.training and torch.is_grad_enabled()
        if not (learn and self.router != "argmax"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(q_pos, q, k))
        b, h, n, d = k.shape
        bs = self.block_size
        nc = n // bs
        gate_keys = k[:, :, : nc * bs].reshape(b, h, nc, bs, d).mean(3)  # [B, H, nc, d], with gradient
        chosen = self.select(q_pos, q, k)
        keep = self._expand(q_pos, chosen, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        if "gate" in self.router and nc:
            out = out + self._gate(q, k, v, gate_keys, chosen[..., :nc], keep, out.detach())
        if "distill" in self.router and self.distill_weight > 0:
            terms, rows = block_distillation_loss(
                q, k, gate_keys, block_size=bs, scale=d**-0.5, gate_scale=self.gate_scale,
                queries=self.distill_queries, read=self.objective_rows,
            )  # fmt: skip
            if terms.numel():  # the loss is their mean, each term attached to its own query's row
                out = attach_loss(out, terms * (self.distill_weight / terms.numel()), rows)
        return out

    def _gate(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_keys: torch.Tensor,
        chosen: torch.Tensor, keep: torch.Tensor, out: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The straight-through gate's term, exactly zero in value: ``sum_j st_ij c_ij``.

        ``st_ij = log pi_i(j) - sg(log pi_i(j))`` on the selected blocks ``j`` (0 elsewhere) is the shift
        that ``"gate"`` adds to the logits of block ``j``'s keys; since it is 0, the output's derivative
        in it is the detached ``c_ij = sum_{t in j} p_it (v_t - o_i)`` (``p`` the attention weights, ``o``
        the output), so adding ``st_ij c_ij`` gives the gradient of the shifted logits while the output
        stays the fused kernel's bit for bit (a float mask with gradient would take another kernel).
        """
        b, h, n, d = q.shape
        bs, nc = self.block_size, gate_keys.shape[2]
        q_pos = torch.arange(n, device=q.device)
        past = torch.arange(nc, device=q.device)[None, :] < (q_pos // bs)[:, None]  # [N, nc]
        scores = (q @ gate_keys.transpose(-1, -2)) * self.gate_scale  # [B, H, N, nc]
        # log pi_i(j) over the past (complete) blocks; rows without any get 0s (finite, unused)
        scores = scores.masked_fill(~past, float("-inf")).masked_fill(~past.any(-1, keepdim=True), 0.0)
        logpi = scores - torch.logsumexp(scores, dim=-1, keepdim=True)
        st = torch.where(chosen, logpi - logpi.detach(), 0.0)  # exactly 0 in value
        with torch.no_grad():
            logits = (q * d**-0.5) @ k.transpose(-1, -2)
            p = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)[..., : nc * bs]
            vb = v[:, :, : nc * bs].unflatten(2, (nc, bs))  # [B, H, nc, b, dv]
            pv = torch.einsum("bhnjt,bhjtd->bhnjd", p.unflatten(-1, (nc, bs)), vb)  # [B, H, N, nc, dv]
            c = pv - p.unflatten(-1, (nc, bs)).sum(-1, keepdim=True) * out[:, :, :, None]
        return (st[..., None] * c).sum(-2)

    def select(self, q_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, H, T, nb]``: the past blocks each query selects (never its own or a later one)."""
        b, h, length, d = k.shape
        bs = self.block_size
        nc = length // bs  # complete blocks; any block a query may select is complete
        nb = -(-length // bs)
        chosen = torch.zeros(b, h, q.shape[2], nb, dtype=torch.bool, device=q.device)
        s = min(self.top_blocks, nc)
        if s == 0:
            return chosen
        gate_keys = k[:, :, : nc * bs].reshape(b, h, nc, bs, d).mean(3)  # [B, H, nc, d]
        scores = q.detach() @ gate_keys.detach().transpose(-1, -2)  # [B, H, T, nc]; no gradient: a choice
        past = torch.arange(nc, device=q.device)[None, :] < (q_pos // bs)[:, None]  # [T, nc]
        scores = scores.masked_fill(~past, float("-inf"))  # mask the future *before* top-s
        top = scores.topk(s, dim=-1)
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top.indices, True)
        picked &= past  # queries with fewer than s past blocks picked some masked ones: drop those
        chosen[..., :nc] = picked
        return chosen

    def allowed(self, q_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self._expand(q_pos, self.select(q_pos, q, k), k.shape[2])

    def _expand(self, q_pos: torch.Tensor, chosen: torch.Tensor, length: int) -> torch.Tensor:
        """Bool ``[B, H, T, L]``: the keys of the ``chosen`` blocks and the own block up to the query."""
        k_pos = torch.arange(length, device=chosen.device)
        blocks = chosen.repeat_interleave(self.block_size, dim=-1)[..., :length]
        own = (k_pos[None, :] // self.block_size == q_pos[:, None] // self.block_size) & (
            k_pos[None, :] <= q_pos[:, None]
        )
        return blocks | own  # [B, H, T, L]


#: How causal MiTA's router learns (``MiTACausal(router=...)``).
ROUTERS = ("argmax", "gate", "distill", "gate+distill", "distill+select", "gate+distill+select", "grouped")


class MiTACausal(CausalMixer):
    """Causal MiTA (SPEC §5): landmarks = block means of the queries, ``experts_per_query`` routed experts
    of ``topk`` keys each, the shared expert over each landmark's horizon and the own block, in one
    softmax (:func:`mita.mita_causal_attention`).

    Args:
        block_size: b, landmark block (and own-block) size.
        topk: k, keys per routed expert.
        experts_per_query: s, routed experts per query (its ``s`` best earlier landmarks).
        landmark_horizon: ``"prefix"`` (keys before the query's block) or ``"frozen"`` (keys up to the
            end of the landmark's own block); SPEC §5.2.
        backend: the op backend (``"auto"`` | ``"torch"`` | ``"reference"`` | ``"cpu"``).
        shared: keep the shared expert (the landmarks' logits and values); ``False`` attends to the routed
            expert and the own block only (SPEC §2.5's ablation; docs/causal.md shows where it matters).
        router: how the routing ``argmax_j q . r_j`` learns (:data:`ROUTERS`; docs/causal.md, "Routing
            that learns"). ``"gate+distill+select"`` (default): the next two and ``"+select"``.
            ``"gate+distill"``: both of the next two. ``"gate"``: the
            straight-through router gate of the op (``router_gate=True``): outputs unchanged bit for bit,
            the chosen landmark is credited with its routed keys' gradient. ``"distill"``: in training, a
            routing distillation loss from dense attention (:mod:`mita.nn.causal_router`) on
            ``distill_queries`` queries per sequence, weight ``distill_weight``, attached to the output
            (the forward values are unchanged; no training loop needs to know; each sampled query's
            term is attached to its own output row and depends on positions up to it, so every output's
            Jacobian stays free of later positions). ``"grouped"`` (``"frozen"`` only): in
            training, the routed part takes every visible landmark's keys, each set's logits shifted by
            ``log pi_i(j)`` (the op's ``grouped=True``, on the torch backend); in evaluation the argmax
            as usual. ``"argmax"``: the behaviour before these, where the routing gets no gradient of its
            own (only the shared logits reach ``q . r_j``). ``"+select"``: the distillation also
            teaches the landmarks' key selection (:func:`mita.nn.causal_router.selection_cross_entropy`,
            weight ``select_weight``): each landmark's attention over its horizon, whose top-k is its
            routed key set, learns the dense attention of the sampled queries that route to it; without
            it the selection gets no gradient of its own.
        distill_weight, distill_queries: the distillation loss's weight and sampled queries per sequence.
        select_weight: the key-selection term's weight (relative to the routing KL), with ``"+select"``.
            ``None`` (default): ``min(0.3, block_size / 64)``. The term reaches each query through its
            block mean, ``1 / b`` of it per query, so small blocks take less: at b = 8 a weight of 0.3
            or more breaks learning, 0.125 does not; at b = 64, 0.3 beats 1 at N = 2048 in every seed
            measured (docs/causal.md, "Teaching the landmarks' key selection").

    Set ``record_routing = True`` to keep the last forward's routing in ``last_routing``.
    """

    kind = "mita"

    def __init__(
        self,
        block_size: int = 64,
        topk: int = 64,
        landmark_horizon: str = "prefix",
        backend: str = "auto",
        shared: bool = True,
        router: str = "gate+distill+select",
        distill_weight: float = 1.0,
        distill_queries: int = 32,
        experts_per_query: int = 1,
        select_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.shared = as_bool("shared", shared)
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        self.distill_weight = as_weight("distill_weight", distill_weight)
        self.block_size = _positive_int("block_size", block_size)
        if select_weight is None:
            select_weight = min(0.3, self.block_size / 64)
        self.select_weight = as_weight("select_weight", select_weight)
        if router == "grouped" and landmark_horizon != "frozen":
            raise ValueError("router='grouped' needs landmark_horizon='frozen'")
        self.router = router
        self.distill_queries = _positive_int("distill_queries", distill_queries)
        self.topk = _positive_int("topk", topk)
        self.experts_per_query = as_int("experts_per_query", experts_per_query)
        if router == "grouped" and self.experts_per_query != 1:
            raise ValueError("router='grouped' needs experts_per_query=1")
        self.landmark_horizon, self.backend = as_horizon(landmark_horizon), backend
        self.record_routing = False
        self.last_routing: Any = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_qkv(q, k, v)
        landmarks = block_mean(q, self.block_size)
        distill = "distill" in self.router and self.training and torch.is_grad_enabled()
        res = mita_causal_attention(
            q, k, v, landmarks, topk=self.topk, block_size=self.block_size,
            landmark_horizon=self.landmark_horizon, experts_per_query=self.experts_per_query,
            backend=self.backend, shared=self.shared,
            return_routing=self.record_routing or distill, router_gate="gate" in self.router,
            grouped=self.router == "grouped" and self.training and torch.is_grad_enabled(),
        )  # fmt: skip
        out, routing = res if self.record_routing or distill else (res, None)
        if distill and self.distill_weight > 0:
            terms, rows = routing_distillation_loss(
                q, k, landmarks, routing, scale=q.shape[-1] ** -0.5, landmark_scale=1.0 / q.shape[-1],
                queries=self.distill_queries, read=self.objective_rows,
                select_weight=self.select_weight if "select" in self.router else 0.0,
            )  # fmt: skip
            if terms.numel():  # the loss is their mean, each term attached to its own query's row
                out = attach_loss(out, terms * (self.distill_weight / terms.numel()), rows)
        if self.record_routing:
            self.last_routing = routing
        return out

    def new_cache(self) -> Any:
        return MiTACache(
            topk=self.topk,
            block_size=self.block_size,
            landmark_horizon=self.landmark_horizon,
            experts_per_query=self.experts_per_query,
            shared=self.shared,
        )


CAUSAL_CLASSES: dict[str, type[CausalMixer]] = {
    "full": FullCausal,
    "mita": MiTACausal,
    "moba": MoBACausal,
    "window": WindowCausal,
}
CAUSAL_KINDS = tuple(CAUSAL_CLASSES)
#: The options each kind takes: its constructor's keywords.
CAUSAL_OPTIONS: dict[str, tuple[str, ...]] = {
    kind: tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")
    for kind, cls in CAUSAL_CLASSES.items()
}
ALL_OPTIONS = frozenset(o for opts in CAUSAL_OPTIONS.values() for o in opts)


def build_causal_mixer(kind: str, **kw: Any) -> CausalMixer:
    """The causal mixer ``kind`` (one of :data:`CAUSAL_KINDS`) with options ``kw``.

    Options the kind does not take raise ValueError naming them, as :func:`mita.nn.build_attention`; to
    carry one set of settings across kinds, filter it first with :func:`filter_causal_kwargs`.
    """
    if kind not in CAUSAL_CLASSES:
        raise ValueError(f"unknown causal attention kind {kind!r}; choose one of {CAUSAL_KINDS}")
    check_kwargs("causal attention", kind, kw, CAUSAL_OPTIONS[kind])
    return CAUSAL_CLASSES[kind](**kw)


def filter_causal_kwargs(kind: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kw`` that causal ``kind`` takes, to carry one set of settings across kinds (as
    :class:`mita.models.GPT`'s presets do); options that no causal kind takes raise ValueError naming
    them (a misspelling is not silently dropped)."""
    if kind not in CAUSAL_CLASSES:
        raise ValueError(f"unknown causal attention kind {kind!r}; choose one of {CAUSAL_KINDS}")
    unknown = set(kw) - ALL_OPTIONS
    if unknown:
        raise ValueError(f"unknown causal attention options {sorted(unknown)}; known: {sorted(ALL_OPTIONS)}")
    return {k: v for k, v in kw.items() if k in CAUSAL_OPTIONS[kind]}
