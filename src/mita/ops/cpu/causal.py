"""``backend="cpu"`` with ``causal=True``: causal MiTA with the ``"frozen"`` horizon on fused CPU kernels.

torch computes the shared values ``A_j`` over keys ``t < (j + 1) b`` (one masked attention of the
landmarks through SDPA, autograd carrying the gradients of ``R``, ``K`` and ``V``). The kernels of
``causal_kernel.cpp`` choose each landmark's top-k keys over its horizon (computing only the visible
scores ``r_j . k_t``, ``t < (j + 1) b``) and compute, per (batch, head) in one pass, each query's single
online softmax over its visible shared logits ``lambda q_i . r_j`` (computed in the kernel: no ``N x n_l``
tensor), its routed experts' keys and its own block (causal), with a backward that recomputes the
logits and probabilities from the saved log-sum-exp and returns the gradients of q, k, v, the landmarks
(through the shared logits) and ``A``. Supported: s >= 1 (top-s routing in torch for s > 1, argmax in
the kernel for s = 1), GQA, ``shared=False``, ``routed=False``, float32 and float64 (half precision
computed in float32). The ``"prefix"`` horizon has no fused kernel (each query block sees its own key
sets); ``backend="cpu"`` refuses it and ``"auto"`` uses the torch backend for it.

Under ``torch.compile`` the kernels run as ``torch.library.custom_op``s with fake implementations and
registered autograd; in eager mode through a plain ``autograd.Function`` (as :mod:`.backend`, to keep
``torch._dynamo`` out of processes that never compile). No host sync.

Memory per head (``n_l = N / b``): a boolean ``n_l * N`` mask for SDPA (and its working memory), ``A``
``n_l * dv``, the key sets ``n_l * k``, a copy of ``K^T``, and per query head dK/dV rows in the backward
(summed over GQA groups); with ``s > 1`` also ``Q R^T`` (``N * n_l``, no gradient) for the top-s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal.common import CausalProblem, CausalRouting
from .build import availability

Tensor = torch.Tensor
LIB = "mita_cpu_causal"


def causal_kernel_available() -> tuple[bool, str]:
    """Whether the causal CPU kernel library is built and loaded here, and if not, why."""
    return availability(LIB, probe="fwd")


@torch.library.custom_op("mita::cpu_causal_topk", mutates_args=())
def cpu_causal_topk(landmarks: Tensor, k: Tensor, topk: int, block_size: int) -> Tensor:
    """Frozen key sets [B, H, n_l, topk]: landmark j's top-k of ``r_j . k_t`` over ``t < (j + 1) b``
    (increasing index order, -1 in slots beyond the visible keys)."""
    return torch.ops.mita_cpu_causal.topk_frozen(landmarks, k, topk, block_size)


@cpu_causal_topk.register_fake
def _(landmarks, k, topk, block_size):
    return landmarks.new_empty(*landmarks.shape[:-1], topk, dtype=torch.long)


@torch.library.custom_op("mita::cpu_causal_attention", mutates_args=())
def cpu_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Tensor,
    shared_values: Tensor | None,
    key_index: Tensor,
    expert_index: Tensor | None,
    scale: float,
    landmark_scale: float,
    block_size: int,
    routed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Output [B, H, N, dv], log-sum-exp [B, H, N] and, when ``expert_index`` is None (s = 1), the
    routing argmax [B, H, N, 1] (-1 in block 0; else an empty tensor)."""
    return torch.ops.mita_cpu_causal.fwd(
        q, k, v, landmarks, shared_values, key_index, expert_index, scale, landmark_scale, block_size, routed
    )


@cpu_causal_attention.register_fake
def _(q, k, v, landmarks, shared_values, key_index, expert_index, scale, landmark_scale, block_size, routed):
    b, h, n, _ = q.shape
    routing = q.new_empty(0 if expert_index is not None else b, h, n, 1, dtype=torch.long)
    return q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b, h, n), routing


@torch.library.custom_op("mita::cpu_causal_attention_backward", mutates_args=())
def cpu_causal_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Tensor,
    shared_values: Tensor | None,
    key_index: Tensor,
    expert_index: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    scale: float,
    landmark_scale: float,
    block_size: int,
    routed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk and dv per query head [B, H, N, .], d landmarks (shared logits part), d shared_values."""
    return torch.ops.mita_cpu_causal.bwd(
        q, k, v, landmarks, shared_values, key_index, expert_index, out, lse, grad_out, scale, landmark_scale,
        block_size, routed,
    )  # fmt: skip


@cpu_causal_attention_backward.register_fake
def _(q, k, v, landmarks, shared_values, key_index, expert_index, out, lse, grad_out, scale,
      landmark_scale, block_size, routed):  # fmt: skip
    b, h, n = q.shape[0], q.shape[1], q.shape[2]
    dsv = torch.empty_like(shared_values) if shared_values is not None else q.new_empty(0)
    return (torch.empty_like(q), q.new_empty(b, h, n, k.shape[-1]), q.new_empty(b, h, n, v.shape[-1]),
            torch.empty_like(landmarks), dsv)  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, r, sv, key_index, expert_index, scale, landmark_scale, block_size, routed = inputs
    out, lse, routing = output
    if expert_index is None:
        expert_index = routing
    ctx.save_for_backward(q, k, v, r, sv, key_index, expert_index, out, lse)
    ctx.args = (scale, landmark_scale, block_size, routed)


def _backward(ctx, grad_out, grad_lse, grad_routing, bwd=None):
    q, k, v, r, sv, key_index, expert_index, out, lse = ctx.saved_tensors
    dq, dk, dv, dr, dsv = (bwd or cpu_causal_attention_backward)(
        q, k, v, r, sv, key_index, expert_index, out, lse, grad_out.contiguous(), *ctx.args
    )
    b, h, hkv = q.shape[0], q.shape[1], k.shape[1]
    if h != hkv:  # GQA: each query head wrote its own rows; sum them over the group, in a fixed order
        dk = dk.reshape(b, hkv, h // hkv, *dk.shape[2:]).sum(2)
        dv = dv.reshape(b, hkv, h // hkv, *dv.shape[2:]).sum(2)
    if sv is None:  # landmarks only route: no gradient
        return dq, dk, dv, None, None, None, None, None, None, None, None
    return dq, dk, dv, dr, dsv, None, None, None, None, None, None


cpu_causal_attention.register_autograd(_backward, setup_context=_setup_context)


class _EagerCausal(torch.autograd.Function):
    """The same forward and backward as :func:`cpu_causal_attention`, calling the C++ ops directly."""

    @staticmethod
    def forward(ctx, *inputs):
        output = torch.ops.mita_cpu_causal.fwd(*inputs)
        ctx.mark_non_differentiable(output[1], output[2])
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_routing):
        return _backward(ctx, grad_out, grad_lse, grad_routing, bwd=torch.ops.mita_cpu_causal.bwd)


def _attention(*inputs):
    if torch.compiler.is_compiling():
        return cpu_causal_attention(*inputs)
    return _EagerCausal.apply(*inputs)


def _topk(landmarks: Tensor, k: Tensor, topk: int, block_size: int) -> Tensor:
    if torch.compiler.is_compiling():
        return cpu_causal_topk(landmarks, k, topk, block_size)
    return torch.ops.mita_cpu_causal.topk_frozen(landmarks, k, topk, block_size)


def _top_s(p: CausalProblem, qr: Tensor) -> Tensor:
    """Top-s experts [B, H, N, s] among landmarks ``j < beta(i)``, best first, -1 where fewer are visible
    (as :func:`mita.ops.causal.common.route`)."""
    n, b, nl, s = p.seq_len, p.block_size, p.num_landmarks, p.experts_per_query
    beta = torch.arange(n, device=qr.device) // b
    allowed = torch.arange(nl, device=qr.device)[None, :] < beta[:, None]
    se = min(s, nl)
    idx = qr.detach().masked_fill(~allowed, float("-inf")).topk(se, dim=-1).indices
    if se < s:
        idx = torch.cat([idx, idx.new_zeros(*idx.shape[:-1], s - se)], dim=-1)
    valid = torch.arange(s, device=qr.device)[None, :] < beta[:, None]  # rank r needs r + 1 landmarks
    return torch.where(valid, idx, -1)


def cpu_causal_forward(
    p: CausalProblem,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Tensor,
    return_routing: bool = False,
) -> tuple[Tensor, CausalRouting | None]:
    """SPEC §5 with the ``"frozen"`` horizon on the fused CPU kernels; the same choices as
    :func:`mita.ops.causal.torch_backend.causal_torch_forward` (same routing, same key sets)."""
    if p.horizon != "frozen":
        raise ValueError(
            f"backend='cpu' with causal=True supports landmark_horizon='frozen' only, got {p.horizon!r}; "
            "use backend='torch' or 'auto' for 'prefix'"
        )
    ok, why = causal_kernel_available()  # builds or loads the library once; a dict lookup after
    if not ok:
        raise RuntimeError(f"backend='cpu' is unavailable: {why}")
    out_dtype = q.dtype
    if out_dtype not in (torch.float32, torch.float64):
        # bf16/fp16 inputs: compute in float32 (half-precision softmax statistics lose too much).
        q, k, v, landmarks = (t.float() for t in (q, k, v, landmarks))
    bsz, h, n, _ = q.shape
    nl, b, s, g = p.num_landmarks, p.block_size, p.experts_per_query, p.group
    kk = min(p.topk, max(1, nl * b))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    landmarks = landmarks.contiguous()
    if nl > 0 and (p.routed or return_routing):
        key_index = _topk(landmarks.detach(), k.detach(), kk, b)
    else:
        width = kk if return_routing else 0  # nothing to select: no landmark, or routing off and unasked
        key_index = torch.full((bsz, h, nl, width), -1, dtype=torch.long, device=q.device)
    values = None
    if p.shared and nl > 0:
        t = torch.arange(nl * b, device=q.device)
        horizon = t[None, :] < (torch.arange(nl, device=q.device)[:, None] + 1) * b  # [n_l, n_l * b]
        # A_j over keys t < (j + 1) b: one masked attention of the landmarks (SDPA's fused kernel).
        values = F.scaled_dot_product_attention(
            landmarks, k[:, :, : nl * b], v[:, :, : nl * b], attn_mask=horizon, scale=p.scale,
            enable_gqa=g > 1,
        ).contiguous()  # fmt: skip
    expert_index = None
    if s > 1 and nl > 0:
        with torch.no_grad():
            expert_index = _top_s(p, q @ landmarks.transpose(-1, -2))
    if s > 1 and nl == 0:
        expert_index = torch.full((bsz, h, n, s), -1, dtype=torch.long, device=q.device)
    if not p.shared:
        landmarks = landmarks.detach()  # routing only: no gradient
    out, _, routing = _attention(
        q, k, v, landmarks, values, key_index, expert_index, p.scale, p.landmark_scale, b, p.routed
    )
    out = out.to(out_dtype)
    if not return_routing:
        return out, None
    if expert_index is None:
        expert_index = routing
    return out, CausalRouting(expert_index, key_index, p.horizon, b)
