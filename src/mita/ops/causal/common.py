"""What the causal backends share (SPEC §5): the validated :class:`CausalProblem`, the
:class:`CausalRouting` they return, input validation, and the masked partial softmax they merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..arguments import as_bool, as_experts, as_horizon, as_int, as_scale, check_attention_tensors

CAUSAL_BACKENDS = ("auto", "reference", "torch", "cpu")  # "cpu": the frozen horizon only


@dataclass(frozen=True)
class CausalProblem:
    """Validated sizes and options of one causal MiTA call."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    value_dim: int
    block_size: int
    topk: int
    experts_per_query: int
    scale: float
    landmark_scale: float
    shared: bool
    routed: bool
    horizon: str
    router_gate: bool = False
    grouped: bool = False

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.heads // self.kv_heads

    @property
    def num_landmarks(self) -> int:
        """``n_l = N // b``: one landmark per complete block."""
        return self.seq_len // self.block_size

    @property
    def num_query_blocks(self) -> int:
        """``ceil(N / b)``: blocks holding queries (the last one may be partial)."""
        return -(-self.seq_len // self.block_size)


class CausalRouting(NamedTuple):
    """What causal MiTA chose (indices carry no gradient; ``-1`` marks "none").

    - ``expert_index`` [B, H, N, s]: query ``i``'s experts, best first, among landmarks ``j < beta(i)``;
      ``-1`` where fewer than ``s`` landmarks are visible (always in block 0).
    - ``key_index``: each routed expert's key set, ``-1`` in unfilled slots (fewer than ``k`` visible keys)
      and for unusable pairs. ``"prefix"``: [B, H, ceil(N / b), n_l, k], the set of landmark ``j`` as seen
      by query block ``beta`` (keys ``t < beta * b``; only ``j < beta`` is used, the rest is ``-1``).
      ``"frozen"``: [B, H, n_l, k], landmark ``j``'s set over keys ``t < (j + 1) * b``.
      ``k`` here is ``min(topk, n_l * b)`` (no more keys can ever be visible).
    """

    expert_index: torch.Tensor
    key_index: torch.Tensor
    horizon: str
    block_size: int


def validate_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    block_size: int,
    landmark_horizon: str,
    experts_per_query: int,
    scale: float | None,
    landmark_scale: float | None,
    shared: bool,
    routed: bool,
    dedup: bool,
    key_padding_mask: torch.Tensor | None,
    backend: str,
    router_gate: bool = False,
    grouped: bool = False,
) -> CausalProblem:
    """Check the inputs of :func:`mita.mita_causal_attention`; return their :class:`CausalProblem`."""
    check_attention_tensors(q, k, v, landmarks)
    b, h, n, d = q.shape
    _, hkv, nk, _ = k.shape
    if nk != n:
        raise ValueError(f"causal MiTA needs k and q of the same length (self-attention), got q {n}, k {nk}")
    bs = as_int("block_size", block_size)
    if landmarks.shape[2] != n // bs:
        raise ValueError(
            f"landmarks must have N // block_size = {n} // {bs} = {n // bs} rows (one per complete block), "
            f"got {landmarks.shape[2]}"
        )
    landmark_horizon = as_horizon(landmark_horizon)
    topk = as_int("topk", topk)
    experts_per_query = as_int("experts_per_query", experts_per_query)
    (shared, routed), dedup = as_experts(shared, routed), as_bool("dedup", dedup)
    router_gate, grouped = as_bool("router_gate", router_gate), as_bool("grouped", grouped)
    if grouped and (landmark_horizon != "frozen" or not routed or experts_per_query != 1 or router_gate):
        raise ValueError(
            "grouped=True (every visible expert, weighted by the router) needs landmark_horizon='frozen', "
            "routed=True, experts_per_query=1 and router_gate=False"
        )
    if grouped and backend == "cpu":
        raise ValueError("grouped=True has no fused cpu kernel; use backend='torch' or 'auto'")
    scale, landmark_scale = as_scale("scale", scale), as_scale("landmark_scale", landmark_scale)
    if dedup:
        raise ValueError(
            "dedup=True is not supported by causal MiTA (keys of several experts are concatenated)"
        )
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask is not supported by causal MiTA: pad at the end (causality already hides "
            "later positions from earlier ones) or split the batch"
        )
    if backend not in CAUSAL_BACKENDS:
        raise ValueError(
            f"backend={backend!r} has no causal path; causal MiTA runs on one of {CAUSAL_BACKENDS}"
        )
    return CausalProblem(
        batch=b,
        heads=h,
        kv_heads=hkv,
        seq_len=n,
        head_dim=d,
        value_dim=v.shape[3],
        block_size=bs,
        topk=topk,
        experts_per_query=experts_per_query,
        scale=float(scale) if scale is not None else float(d) ** -0.5,
        landmark_scale=float(landmark_scale) if landmark_scale is not None else 1.0 / float(d),
        shared=shared,
        routed=routed,
        horizon=landmark_horizon,
        router_gate=router_gate and routed,  # without routed experts there is nothing to gate
        grouped=grouped,
    )


def route(p: CausalProblem, q: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``qr`` = Q R^T [B, H, N, n_l] and ``expert_index`` [B, H, N, s] (best first, -1 where none),
    the argmax / top-s over landmarks ``j < beta(i)`` (masked before selection)."""
    n, b, nl, s = p.seq_len, p.block_size, p.num_landmarks, p.experts_per_query
    qr = q @ landmarks.transpose(-1, -2)
    beta = torch.arange(n, device=q.device) // b
    allowed = torch.arange(nl, device=q.device)[None, :] < beta[:, None]  # [N, n_l]
    scores = qr.detach().masked_fill(~allowed, float("-inf"))
    se = min(s, nl)
    if se == 1:
        idx = scores.argmax(-1, keepdim=True)
    else:
        idx = scores.topk(se, dim=-1).indices
    if se < s:
        idx = torch.cat([idx, idx.new_zeros(*idx.shape[:-1], s - se)], dim=-1)
    valid = torch.arange(s, device=q.device)[None, :] < beta[:, None]  # rank r needs r + 1 landmarks
    return qr, torch.where(valid, idx, -1)


def router_gate_shift(p: CausalProblem, qr: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """The straight-through router gate: ``l - stopgrad(l)`` [B, H, N, s], exactly 0 in the forward pass.

    ``l[..., r] = log pi_i(e_r(i))`` with ``pi_i = softmax_{j < beta(i)} (lambda q_i . r_j)`` (the shared
    expert's landmark logits, normalised over the visible landmarks) and ``e_r(i)`` the query's ``r``-th
    expert; 0 where there is none (``-1``). Added to every routed logit of expert ``r`` (equivalently to
    the log-sum-exp of its routed part), it leaves every output unchanged bit for bit and gives the
    routing logits the gradient ``(1[j = e] - pi_j) lambda`` times the summed gradient of those routed
    logits: the chosen landmark is credited with whether its keys helped.
    """
    logits, lse, _ = _router_logits(p, qr)
    logp = logits.gather(-1, expert_index.clamp_min(0)) - lse  # only the chosen entries of log pi
    logp = torch.where(expert_index >= 0, logp, 0.0)
    return logp - logp.detach()


def _router_logits(p: CausalProblem, qr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's masked logits ``lambda q_i . r_j`` [B, H, N, n_l] (``-inf`` for ``j >= beta(i)``, 0 in
    rows with no visible landmark, so nothing is NaN), their log-sum-exp [B, H, N, 1] and the mask.

    ``logits - logsumexp`` rather than ``log_softmax``: on CPU, torch's (log-)softmax over a short last
    dimension (``n_l``) runs a slow path, about 10x the time of ``logsumexp``; the two differ by rounding."""
    n, b, nl = p.seq_len, p.block_size, p.num_landmarks
    allowed = torch.arange(nl, device=qr.device)[None, :] < (torch.arange(n, device=qr.device) // b)[:, None]
    logits = (qr * p.landmark_scale).masked_fill(~allowed, float("-inf"))
    logits = logits.masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # block 0: no landmark, no NaN
    return logits, torch.logsumexp(logits, dim=-1, keepdim=True), allowed


def router_log_probs(p: CausalProblem, qr: torch.Tensor) -> torch.Tensor:
    """``log pi_i(j)`` [B, H, N, n_l]: log-softmax of ``lambda q_i . r_j`` over ``j < beta(i)``; ``-inf``
    for the others, and 0 in rows with no visible landmark (block 0), so nothing is NaN."""
    logits, lse, allowed = _router_logits(p, qr)
    return (logits - lse).masked_fill(~allowed, float("-inf"))


def partial_softmax(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One part of the single softmax: ``(lse [..., 1], softmax(logits) @ values [..., dv])``.

    ``logits`` [..., L] may hold ``-inf`` (masked); a row masked entirely gives output 0 and a hugely
    negative but finite lse, so it gets weight exactly 0 when parts are merged (and no NaN gradient).
    """
    mx = logits.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    e = torch.exp(logits - mx)
    z = e.sum(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
    return mx + torch.log(z), (e @ values) / z


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Merge partial softmaxes over disjoint key sets into the one softmax of SPEC §5.5."""
    if len(parts) == 1:
        return parts[0][1]
    # Elementwise (not torch.softmax over a tiny last dim): cheap in decoding, where parts are [B, H, 1, 1].
    top = parts[0][0].detach()
    for lse, _ in parts[1:]:
        top = torch.maximum(top, lse.detach())
    ws = [torch.exp(lse - top) for lse, _ in parts]
    z = ws[0]
    for w in ws[1:]:
        z = z + w
    out = ws[0] * parts[0][1]
    for w, (_, o) in zip(ws[1:], parts[1:]):
        out = out + w * o
    return out / z
