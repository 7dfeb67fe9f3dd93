"""``backend="cpu"`` of the causal op: causal MiTA with the ``"frozen"`` horizon on fused CPU kernels.

Two kernels of ``causal_kernel.cpp``, each with its own backward, chained by autograd:

- the landmark side: each landmark's visible scores ``c r_j . k_t``, ``t < (j + 1) b``, computed once
  (mask before selection) for its top-k keys and its shared value ``A_j = softmax_t(.) v_t``; the
  backward runs key block by key block (block c is seen whole by the landmarks ``j >= c``);
- the attention: per (batch, head) in one pass, each query's single online softmax over its visible
  shared logits ``lambda q_i . r_j`` (computed in the kernel: no ``N x n_l`` tensor), its routed experts'
  keys and its own block (causal); the backward recomputes logits and probabilities from the saved
  log-sum-exp and returns the gradients of q, k, v, the landmarks (through the shared logits) and ``A``.

Supported: s >= 1 (top-s routing in torch for s > 1, argmax in the kernel for s = 1), GQA,
``shared=False``, ``routed=False``, float32 and float64 (half precision computed in float32). The
``"prefix"`` horizon has no fused kernel (each query block sees its own key sets); ``backend="cpu"``
refuses it and ``"auto"`` uses the torch backend for it.

Under ``torch.compile`` the kernels run as ``torch.library.custom_op``s with fake implementations and
registered autograd; in eager mode through plain ``autograd.Function``s (as :mod:`..cpu_backend`, to keep
``torch._dynamo`` out of processes that never compile). No host sync.

Memory per head (``n_l = N / b``): ``A`` ``n_l * dv`` and its lse, the key sets ``n_l * k``, padded copies
of ``K^T`` and ``V`` (``N * (d + dv)``), and per query head dK/dV rows in the backwards (summed over GQA
groups); with ``s > 1`` also ``Q R^T`` (``N * n_l``, no gradient) for the top-s. Nothing ``N x N`` or
``N x n_l`` otherwise.

The straight-through router gate (``router_gate=True``, :func:`mita.ops.causal.common.router_gate_shift`)
is carried by the attention kernel's backward: the forward is unchanged (the same routing, bit for bit),
and the backward sums each (query, expert) pair's routed logit gradients from the routed probabilities it
computes anyway, then applies the gate's chain rule through ``log pi_i(e)`` together with the shared
logits' gradient (the same ``q . r_j``; with ``shared=False`` a pass over them for the gate alone). No
torch recomputation of the routed part and no ``N x n_l`` tensor; the landmarks then get a gradient even
with ``shared=False`` (they route).
"""

from __future__ import annotations

import torch

from ..common import sum_groups
from ..cpu.build import availability
from ..cpu.dispatch import eager_or_compiled, fake_attention_outputs
from .common import CausalProblem, CausalRouting, route

Tensor = torch.Tensor
LIB = "mita_cpu_causal"


def causal_kernel_available() -> tuple[bool, str]:
    """Whether the causal CPU kernel library is built and loaded here, and if not, why."""
    return availability(LIB, probe="fwd")


@torch.library.custom_op("mita::cpu_causal_landmarks", mutates_args=())
def cpu_causal_landmarks(
    landmarks: Tensor, k: Tensor, v: Tensor, scale: float, block_size: int, topk: int, values: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Shared values A [B, H, n_l, dv] over keys ``t < (j + 1) b`` and their lse [B, H, n_l] (empty when
    ``values`` is False), and the key sets [B, H, n_l, topk] (-1 beyond the visible keys)."""
    return torch.ops.mita_cpu_causal.landmark_fwd(landmarks, k, v, scale, block_size, topk, values)


@cpu_causal_landmarks.register_fake
def _(landmarks, k, v, scale, block_size, topk, values):
    b, h, nl, _ = landmarks.shape
    m = nl if values else 0
    return (landmarks.new_empty(b, h, m, v.shape[-1]), landmarks.new_empty(b, h, m),
            landmarks.new_empty(b, h, nl, topk, dtype=torch.long))  # fmt: skip


@torch.library.custom_op("mita::cpu_causal_landmarks_backward", mutates_args=())
def cpu_causal_landmarks_backward(
    landmarks: Tensor, k: Tensor, v: Tensor, values: Tensor, lse: Tensor, grad_values: Tensor, scale: float,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """d landmarks [B, H, n_l, d]; dk, dv per query head [B, H, N, .]."""
    return torch.ops.mita_cpu_causal.landmark_bwd(
        landmarks, k, v, values, lse, grad_values, scale, block_size
    )


@cpu_causal_landmarks_backward.register_fake
def _(landmarks, k, v, values, lse, grad_values, scale, block_size):
    b, h, n = landmarks.shape[0], landmarks.shape[1], k.shape[2]
    return torch.empty_like(landmarks), k.new_empty(b, h, n, k.shape[-1]), v.new_empty(b, h, n, v.shape[-1])


def _landmarks_setup(ctx, inputs, output):
    r, k, v, scale, block_size, _, _ = inputs
    a, lse, _ = output
    ctx.save_for_backward(r, k, v, a, lse)
    ctx.args = (scale, block_size)


def _landmarks_backward(ctx, grad_a, grad_lse, grad_idx, bwd=None):
    r, k, v, a, lse = ctx.saved_tensors
    dr, dk, dv = (bwd or cpu_causal_landmarks_backward)(r, k, v, a, lse, grad_a.contiguous(), *ctx.args)
    return dr, sum_groups(dk, k.shape[1]), sum_groups(dv, v.shape[1]), None, None, None, None


cpu_causal_landmarks.register_autograd(_landmarks_backward, setup_context=_landmarks_setup)


_landmark_side = eager_or_compiled(
    cpu_causal_landmarks, "mita_cpu_causal", "landmark_fwd", "landmark_bwd", _landmarks_setup,
    _landmarks_backward, (1, 2),
)  # fmt: skip


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
    router_gate: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Output [B, H, N, dv], log-sum-exp [B, H, N] and, when ``expert_index`` is None (s = 1), the
    routing argmax [B, H, N, 1] (-1 in block 0; else an empty tensor). ``router_gate``: the backward
    carries the straight-through router gate (the forward is the same)."""
    return torch.ops.mita_cpu_causal.fwd(
        q, k, v, landmarks, shared_values, key_index, expert_index, scale, landmark_scale, block_size, routed,
        router_gate,
    )  # fmt: skip


@cpu_causal_attention.register_fake
def _(q, k, v, landmarks, shared_values, key_index, expert_index, scale, landmark_scale, block_size, routed,
      router_gate=False):  # fmt: skip
    return fake_attention_outputs(q, v, expert_index)


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
    router_gate: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk and dv per query head [B, H, N, .], d landmarks (shared logits and router gate part),
    d shared_values."""
    return torch.ops.mita_cpu_causal.bwd(
        q, k, v, landmarks, shared_values, key_index, expert_index, out, lse, grad_out, scale, landmark_scale,
        block_size, routed, router_gate,
    )  # fmt: skip


@cpu_causal_attention_backward.register_fake
def _(q, k, v, landmarks, shared_values, key_index, expert_index, out, lse, grad_out, scale,
      landmark_scale, block_size, routed, router_gate=False):  # fmt: skip
    b, h, n = q.shape[0], q.shape[1], q.shape[2]
    dsv = torch.empty_like(shared_values) if shared_values is not None else q.new_empty(0)
    return (torch.empty_like(q), q.new_empty(b, h, n, k.shape[-1]), q.new_empty(b, h, n, v.shape[-1]),
            torch.empty_like(landmarks), dsv)  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, r, sv, key_index, expert_index, scale, landmark_scale, block_size, routed, *gate = inputs
    out, lse, routing = output
    if expert_index is None:
        expert_index = routing
    ctx.save_for_backward(q, k, v, r, sv, key_index, expert_index, out, lse)
    ctx.args = (scale, landmark_scale, block_size, routed, bool(gate and gate[0]))
    ctx.num_inputs = len(inputs)  # router_gate may be left to its default


def _backward(ctx, grad_out, grad_lse, grad_routing, bwd=None):
    q, k, v, r, sv, key_index, expert_index, out, lse = ctx.saved_tensors
    dq, dk, dv, dr, dsv = (bwd or cpu_causal_attention_backward)(
        q, k, v, r, sv, key_index, expert_index, out, lse, grad_out.contiguous(), *ctx.args
    )
    dk, dv = sum_groups(dk, k.shape[1]), sum_groups(dv, v.shape[1])
    rest = (None,) * (ctx.num_inputs - 5)
    if sv is None:  # landmarks only route: no gradient but the gate's
        return dq, dk, dv, dr if ctx.args[-1] else None, None, *rest
    return dq, dk, dv, dr, dsv, *rest


cpu_causal_attention.register_autograd(_backward, setup_context=_setup_context)


_attention = eager_or_compiled(
    cpu_causal_attention, "mita_cpu_causal", "fwd", "bwd", _setup_context, _backward, (1, 2)
)


def cpu_causal_forward(
    p: CausalProblem,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Tensor,
    return_routing: bool = False,
) -> tuple[Tensor, CausalRouting | None]:
    """SPEC §5 with the ``"frozen"`` horizon on the fused CPU kernels; the same choices as
    :func:`mita.ops.causal.torch_backend.causal_torch_forward` (same routing; the same key
    sets except among exactly tied scores, where the fused top-k keeps the lower key indices)."""
    out_dtype = q.dtype
    if out_dtype not in (torch.float32, torch.float64):
        # bf16/fp16 inputs: compute in float32 (half-precision softmax statistics lose too much).
        q, k, v, landmarks = (t.float() for t in (q, k, v, landmarks))
    bsz, h, n, _ = q.shape
    nl, b, s = p.num_landmarks, p.block_size, p.experts_per_query
    kk = min(p.topk, max(1, nl * b))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    landmarks = landmarks.contiguous()
    sets = nl > 0 and (p.routed or return_routing)
    width = kk if sets or return_routing else 0  # no sets: no landmark, or routing off and unasked
    values = None
    if p.shared and nl > 0:
        values, _, key_index = _landmark_side(landmarks, k, v, p.scale, b, width, True)
    elif sets:
        with torch.no_grad():
            _, _, key_index = _landmark_side(
                landmarks.detach(), k.detach(), v.detach(), p.scale, b, width, False
            )
    if not sets:
        key_index = torch.full((bsz, h, nl, width), -1, dtype=torch.long, device=q.device)
    expert_index = None
    if s > 1 and nl > 0:
        with torch.no_grad():
            _, expert_index = route(p, q, landmarks)
    if s > 1 and nl == 0:
        expert_index = torch.full((bsz, h, n, s), -1, dtype=torch.long, device=q.device)
    gate = p.router_gate and nl > 0
    if not p.shared and not gate:
        landmarks = landmarks.detach()  # routing only: no gradient
    out, lse, routing = _attention(
        q, k, v, landmarks, values, key_index, expert_index, p.scale, p.landmark_scale, b, p.routed, gate
    )
    if expert_index is None:
        expert_index = routing
    out = out.to(out_dtype)
    if not return_routing:
        return out, None
    return out, CausalRouting(expert_index, key_index, p.horizon, b)
