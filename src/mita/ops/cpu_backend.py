"""The ``"cpu"`` backend: fused C++ kernels (``kernel.cpp``), in one of two shapes.

Whole-op path (``whole_fwd`` / ``whole_bwd``), for s = 1 without ``dedup`` and head dims that are a
multiple of the vector length, up to :data:`WHOLE_OP_MAX_KEYS` keys: one pass per (batch, head) computes the
landmark side too (``R K^T``, top-k, softmax, ``A = P V``, ``Q R^T``) with the attention step, and the
backward recomputes its probabilities (``Q R^T`` and ``A`` are kept), so nothing of size ``m x N`` is
kept. Beyond that length torch's batched products (oneDNN/MKL) compute the landmark side faster than the
kernel's, so the split path is used:

torch computes ``R K^T`` (its softmax and ``A = P V``, with autograd carrying the gradients of ``R``, ``K``
and ``V`` through ``A``) and ``Q R^T``. The kernels (``kernel.cpp``) choose each landmark's top-k keys,
route each query (argmax, s = 1) and compute the attention step — one online softmax over the m shared
logits and the s*k routed logits — expert by expert, with a backward that recomputes the probabilities
from the saved log-sum-exp. Under ``torch.compile`` they run as ``torch.library.custom_op``s with fake
implementations and registered autograd, in eager mode as plain autograd Functions (:mod:`.dispatch`).
Nothing here syncs with the host.

Top-k ties go to the lower key index and each landmark's keys come in increasing index order; the
selected *set* is the other backends' (``torch.topk``, whose order is unspecified) except among exactly
tied scores, where ``torch.topk``'s choice is unspecified too.
"""

from __future__ import annotations

import torch

from .common import Problem, Routing, sum_groups, without_padding
from .cpu.dispatch import eager_or_compiled, fake_attention_outputs
from .torch_backend import _dedup_mask

Tensor = torch.Tensor

# Longest key sequence the whole-op path takes. Measured on an Intel Xeon (Sapphire Rapids class),
# 1 thread, CPU time, d = 32..64, m = k = 25..64: the whole-op path is ahead at N = 197 (fwd and fwd+bwd)
# and level at 1024, and 8-12 % behind at 4096, where the landmark products dominate.
WHOLE_OP_MAX_KEYS = 2048


def _whole_op_applies(p: Problem, q: Tensor, v: Tensor) -> bool:
    lanes = 8 if q.dtype == torch.float64 else 16  # float32 is used for half-precision inputs
    return (
        p.experts_per_query == 1
        and not p.dedup
        and p.kv_len <= WHOLE_OP_MAX_KEYS
        and p.head_dim % lanes == 0
        and p.value_dim % lanes == 0
    )


@torch.library.custom_op("mita::cpu_whole_op", mutates_args=())
def cpu_whole_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Tensor,
    pad: Tensor | None,
    topk: int,
    scale: float,
    landmark_scale: float,
    shared: bool,
    routed: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole op: output [B, H, N, dv], log-sum-exp [B, H, N], expert index [B, H, N, 1], key index
    [B, H, m, k] and, with ``save`` and the shared expert on, ``Q R^T`` [B, H, N, m] and the shared values
    [B, H, m, dv] for the backward (else empty). float32 or float64, head dims a multiple of the vector
    length."""
    return torch.ops.mita_cpu.whole_fwd(
        q, k, v, landmarks, pad, topk, scale, landmark_scale, shared, routed, save
    )


@cpu_whole_op.register_fake
def _(q, k, v, landmarks, pad, topk, scale, landmark_scale, shared, routed, save):
    b, h, n, _ = q.shape
    m, idx, keep = landmarks.shape[2], dict(dtype=torch.long), b if save and shared else 0
    out = q.new_empty(b, n, h, v.shape[-1]).permute(0, 2, 1, 3)  # the kernel's [B, N, H, dv] layout
    return (out, q.new_empty(b, h, n), q.new_empty(b, h, n, 1, **idx), q.new_empty(b, h, m, topk, **idx),
            q.new_empty(keep, h, n, m), q.new_empty(keep, h, m, v.shape[-1]))  # fmt: skip


@torch.library.custom_op("mita::cpu_whole_op_backward", mutates_args=())
def cpu_whole_op_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Tensor,
    pad: Tensor | None,
    key_index: Tensor,
    expert_index: Tensor,
    out: Tensor,
    lse: Tensor,
    qr: Tensor,
    shared_values: Tensor,
    grad_out: Tensor,
    scale: float,
    landmark_scale: float,
    shared: bool,
    routed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk and dv per query head [B, H, N_kv, .], d landmarks."""
    return torch.ops.mita_cpu.whole_bwd(
        q, k, v, landmarks, pad, key_index, expert_index, out, lse, qr, shared_values, grad_out, scale,
        landmark_scale, shared, routed,
    )  # fmt: skip


@cpu_whole_op_backward.register_fake
def _(q, k, v, landmarks, pad, key_index, expert_index, out, lse, qr, shared_values, grad_out, scale,
      landmark_scale, shared, routed):  # fmt: skip
    b, h, nk = q.shape[0], q.shape[1], k.shape[2]
    if h == k.shape[1]:  # gradients in their inputs' layouts
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(landmarks)
    return (torch.empty_like(q), q.new_empty(b, h, nk, k.shape[-1]), q.new_empty(b, h, nk, v.shape[-1]),
            torch.empty_like(landmarks))  # fmt: skip


def _whole_op_setup_context(ctx, inputs, output):
    q, k, v, landmarks, pad, topk, scale, landmark_scale, shared, routed, save = inputs
    out, lse, expert_index, key_index, qr, values = output
    ctx.save_for_backward(q, k, v, landmarks, pad, key_index, expert_index, out, lse, qr, values)
    ctx.args = (scale, landmark_scale, shared, routed)


def _whole_op_backward(ctx, grad_out, grad_lse, grad_experts, grad_keys, grad_qr, grad_values, bwd=None):
    q, k, v, landmarks, pad, key_index, expert_index, out, lse, qr, values = ctx.saved_tensors
    dq, dk, dv, dr = (bwd or cpu_whole_op_backward)(
        q, k, v, landmarks, pad, key_index, expert_index, out, lse, qr, values, grad_out, *ctx.args
    )
    hkv = k.shape[1]
    shared = ctx.args[2]
    return (dq, sum_groups(dk, hkv), sum_groups(dv, hkv), dr if shared else None,
            None, None, None, None, None, None, None)  # fmt: skip


cpu_whole_op.register_autograd(_whole_op_backward, setup_context=_whole_op_setup_context)


_whole_op = eager_or_compiled(
    cpu_whole_op,
    "mita_cpu",
    "whole_fwd",
    "whole_bwd",
    _whole_op_setup_context,
    _whole_op_backward,
    (1, 2, 3, 4, 5),
)


@torch.library.custom_op("mita::cpu_topk", mutates_args=())
def cpu_topk(scores: Tensor, k: int) -> Tensor:
    """Indices [..., k] of the k largest entries of each row of ``scores`` [..., N], largest first."""
    return torch.ops.mita_cpu.topk(scores, k)


@cpu_topk.register_fake
def _(scores, k):
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.long)


@torch.library.custom_op("mita::cpu_split", mutates_args=())
def cpu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qr: Tensor,
    shared_values: Tensor | None,
    key_index: Tensor,
    expert_index: Tensor | None,
    pad: Tensor | None,
    dup: Tensor | None,
    scale: float,
    landmark_scale: float,
    routed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Output [B, H, N, dv], log-sum-exp [B, H, N] and, when ``expert_index`` is None (s = 1), the
    routing argmax [B, H, N, 1] (else an empty tensor). float32 or float64."""
    return torch.ops.mita_cpu.split_fwd(
        q, k, v, qr, shared_values, key_index, expert_index, pad, dup, scale, landmark_scale, routed
    )


@cpu_attention.register_fake
def _(q, k, v, qr, shared_values, key_index, expert_index, pad, dup, scale, landmark_scale, routed):
    return fake_attention_outputs(q, v, expert_index)


@torch.library.custom_op("mita::cpu_split_backward", mutates_args=())
def cpu_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qr: Tensor,
    shared_values: Tensor | None,
    key_index: Tensor,
    expert_index: Tensor,
    pad: Tensor | None,
    dup: Tensor | None,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    scale: float,
    landmark_scale: float,
    routed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq (routed part), dk and dv per query head [B, H, N_kv, .], d qr, d shared_values."""
    return torch.ops.mita_cpu.split_bwd(
        q, k, v, qr, shared_values, key_index, expert_index, pad, dup, out, lse, grad_out, scale,
        landmark_scale, routed,
    )  # fmt: skip


@cpu_attention_backward.register_fake
def _(q, k, v, qr, shared_values, key_index, expert_index, pad, dup, out, lse, grad_out, scale,
      landmark_scale, routed):  # fmt: skip
    b, h, nk = q.shape[0], q.shape[1], k.shape[2]
    dsv = torch.empty_like(shared_values) if shared_values is not None else q.new_empty(0)
    return (torch.empty_like(q), q.new_empty(b, h, nk, k.shape[-1]), q.new_empty(b, h, nk, v.shape[-1]),
            torch.empty_like(qr), dsv)  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, qr, sv, key_index, expert_index, pad, dup, scale, landmark_scale, routed = inputs
    out, lse, routing = output
    if expert_index is None:
        expert_index = routing
    ctx.save_for_backward(q, k, v, qr, sv, key_index, expert_index, pad, dup, out, lse)
    ctx.args = (scale, landmark_scale, routed)


def _backward(ctx, grad_out, grad_lse, grad_routing, bwd=None):
    q, k, v, qr, sv, key_index, expert_index, pad, dup, out, lse = ctx.saved_tensors
    dq, dk, dv, dqr, dsv = (bwd or cpu_attention_backward)(
        q, k, v, qr, sv, key_index, expert_index, pad, dup, out, lse, grad_out.contiguous(), *ctx.args
    )
    hkv = k.shape[1]
    dk, dv = sum_groups(dk, hkv), sum_groups(dv, hkv)
    return dq, dk, dv, dqr, (dsv if sv is not None else None), None, None, None, None, None, None, None


cpu_attention.register_autograd(_backward, setup_context=_setup_context)


_attention = eager_or_compiled(
    cpu_attention, "mita_cpu", "split_fwd", "split_bwd", _setup_context, _backward, (1, 2)
)


def _topk(scores: Tensor, k: int) -> Tensor:
    return cpu_topk(scores, k) if torch.compiler.is_compiling() else torch.ops.mita_cpu.topk(scores, k)


def _landmark_side(
    p: Problem, k: Tensor, v: Tensor, landmarks: Tensor, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """As :func:`mita.ops.common.landmark_side` (same scores), with the fused top-k: the same key sets
    except among exactly tied scores, where it keeps the lower key indices (``torch.topk``'s choice is
    unspecified); the shared values only when the shared expert is on."""
    b, h, m, d = landmarks.shape
    r = landmarks.reshape(b, p.kv_heads, p.group * m, d)
    scores = (r @ k.transpose(-1, -2)) * p.scale  # [B, Hkv, g*m, N]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    key_index = _topk(scores.detach(), p.topk).reshape(b, h, m, p.topk)
    if not p.shared:
        return key_index, None
    values = torch.softmax(scores, dim=-1) @ v
    return key_index, values.reshape(b, h, m, v.shape[-1])


def cpu_forward(
    p: Problem,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Tensor,
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, Routing]:
    """SPEC §2 with the fused CPU kernels; the same choices as every other backend."""
    out_dtype = q.dtype
    if out_dtype not in (torch.float32, torch.float64):
        # bf16/fp16 inputs: compute in float32 (half-precision softmax statistics lose too much).
        q, k, v, landmarks = (t.float() for t in (q, k, v, landmarks))
    if _whole_op_applies(p, q, v):
        # q, k, v are read in place whatever their batch/head/row strides (rows must be unit-stride)
        # Q R^T and A are kept for the backward (only P is recomputed) when a gradient will be asked for
        save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, landmarks))
        out, _, expert_index, key_index, _, _ = _whole_op(
            q, k, v, landmarks.contiguous(), key_padding_mask, p.topk, p.scale, p.landmark_scale, p.shared,
            p.routed, save,
        )  # fmt: skip
        return out.to(out_dtype), Routing(expert_index, key_index)
    k, v = without_padding(k, v, key_padding_mask)  # the whole-op kernel does this per head, in C++
    key_index, values = _landmark_side(p, k, v, landmarks, key_padding_mask)
    qr = q @ landmarks.transpose(-1, -2)  # [B, H, N, m]: routing scores and (times lambda) shared logits
    if not p.shared:
        qr = qr.detach()  # routing only: no gradient
    expert_index = None
    if p.experts_per_query > 1:
        expert_index = qr.detach().topk(p.experts_per_query, dim=-1).indices
    dup = None
    if p.routed and p.dedup and expert_index is not None:
        dup = _dedup_mask(p, key_index, expert_index)
    out, _, routing = _attention(
        q.contiguous(), k.contiguous(), v.contiguous(), qr, values, key_index, expert_index,
        key_padding_mask, dup, p.scale, p.landmark_scale, p.routed,
    )  # fmt: skip
    if expert_index is None:
        expert_index = routing
    return out.to(out_dtype), Routing(expert_index, key_index)
