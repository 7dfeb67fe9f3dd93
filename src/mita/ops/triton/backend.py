"""The ``"triton"`` backend: fused Triton kernels for MiTA forward and backward (design in docs/triton.md).

Forward, per call:
1. landmark kernel: one pass over K and V per head computes the scores ``R K^T c`` once; they feed
   ``torch.topk`` (each landmark's keys) and an online softmax giving ``A = softmax(R K^T c) V``;
2. routing kernel: ``argmax_j q . r_j`` per query (``Q R^T`` is never stored);
3. queries are packed into fixed-size tiles sharing one expert (device sort, static tile count, no
   host sync) and the attention kernel runs one online softmax per tile over the ``m`` shared entries
   (logits recomputed from R) and the expert's ``k`` keys, loaded by index; O and the row
   log-sum-exp are written in token order.

Backward, all in Triton: the tile kernel gives dQ (no atomics) and the routed dK/dV (atomics, or a
deterministic per-tile buffer + segmented sum when ``torch.are_deterministic_algorithms_enabled()``);
a query-major kernel gives dA and the shared-logit part of dR; two landmark kernels give dR, dK, dV
through ``A``. Nothing of size ``N x m`` is saved for backward.

Only ``s = 1`` and float32/float16/bfloat16 run in the kernels; ``experts_per_query > 1`` (with or
without ``dedup``) and float64 fall back to the torch backend with a one-time warning.
``import triton`` happens only when this backend is used.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..common import ExpertTiles, Problem, Routing, default_tile_size
from ..torch_backend import torch_forward

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_fallback(kind: str, why: str) -> None:
    """Warn once per kind of reason that a call runs on the torch backend instead of the kernels."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"backend='triton' uses the torch backend for {why}; warned once", stacklevel=4)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def availability() -> tuple[bool, str]:
    """``(ok, reason)``: can the Triton kernels run here (CUDA, or CPU under ``TRITON_INTERPRET=1``)?"""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err}); install the extra: pip install 'mita[triton]'"
    if torch.cuda.is_available():
        return True, "triton and a CUDA device are available"
    if _interpreter_requested():
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors in the Triton interpreter (slow)"
    return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU in the Triton interpreter)"


def _kernels():
    """Import the kernel modules (and triton) on first use."""
    from . import attention, landmark, routing, shared

    return landmark, routing, attention, shared


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from . import attention

        if isinstance(attention._attn_fwd_kernel, InterpretedFunction):
            return
        raise RuntimeError(
            "backend='triton' got CPU tensors but the kernels were not built for the Triton interpreter; "
            "set TRITON_INTERPRET=1 before mita's Triton kernels are first imported"
        )
    raise RuntimeError(f"backend='triton' needs CUDA tensors (or CPU and TRITON_INTERPRET=1), got {t.device}")


def _tiling(p: Problem, expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of queries sharing one expert: expert id [T], global query rows and valid flags [T, tile]."""
    bh, m = p.batch * p.heads, p.num_landmarks
    base = torch.arange(bh, device=expert_index.device).reshape(p.batch, p.heads, 1) * m
    experts = (base + expert_index[..., 0]).reshape(-1)  # s = 1: pair index == global query row
    tile = max(16, default_tile_size(p.q_len, m))  # tl.dot needs >= 16 rows
    tiles = ExpertTiles(experts, bh * m, tile)
    return tiles.expert.contiguous(), tiles.pair.contiguous(), tiles.valid.to(torch.uint8).contiguous()


class _MitaTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, r, mask, p: Problem, deterministic: bool):  # noqa: D102
        landmark, routing, attention, _ = _kernels()
        key_index, values, lse_l = landmark.landmark_forward(r, k, v, mask, p.scale, p.topk)
        expert_index = routing.route(q, r)
        tiles = _tiling(p, expert_index)
        out, lse = attention.attention_forward(
            q, k, v, r, values, key_index, mask, tiles,
            scale=p.scale, lam=p.landmark_scale, shared=p.shared, routed=p.routed,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, r, mask, values, lse_l, key_index, *tiles, out, lse)
        ctx.p, ctx.deterministic = p, deterministic
        ctx.mark_non_differentiable(expert_index, key_index)
        return out, expert_index, key_index

    @staticmethod
    def backward(ctx, d_out, _d_expert, _d_keys):  # noqa: D102
        q, k, v, r, mask, values, lse_l, key_index, *tiles, out, lse = ctx.saved_tensors
        p: Problem = ctx.p
        landmark, _, attention, shared = _kernels()
        do = d_out.contiguous()
        delta = (do.float() * out.float()).sum(-1)  # [B, H, N]: rowsum(dO * O) of the one softmax
        dq, dk, dv = attention.attention_backward(
            q, k, v, r, values, do, lse, delta, key_index, mask, tuple(tiles),
            scale=p.scale, lam=p.landmark_scale, shared=p.shared, routed=p.routed,
            deterministic=ctx.deterministic,
        )  # fmt: skip
        if p.shared:
            d_values, dr = shared.shared_backward(q, r, values, do, lse, delta, p.landmark_scale)
            dr += landmark.landmark_backward(r, k, v, mask, p.scale, values, lse_l, d_values, dk, dv)
        else:
            dr = torch.zeros(r.shape, device=r.device, dtype=torch.float32)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dr.to(r.dtype), None, None, None


def triton_forward(
    p: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, Routing]:
    """MiTA through the Triton kernels (same contract as the other backends' ``*_forward``).

    dK/dV of the routed keys are summed deterministically when
    ``torch.are_deterministic_algorithms_enabled()``, else with atomics.
    """
    if p.experts_per_query > 1:
        _warn_fallback("s", f"experts_per_query={p.experts_per_query} (the kernels run s = 1 only)")
        return torch_forward(p, q, k, v, landmarks, key_padding_mask)
    if q.dtype not in _KERNEL_DTYPES:
        _warn_fallback("dtype", f"dtype {q.dtype} (the kernels run float32, float16 and bfloat16)")
        return torch_forward(p, q, k, v, landmarks, key_padding_mask)
    _check_device(q)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    deterministic = torch.are_deterministic_algorithms_enabled()
    out, expert_index, key_index = _MitaTriton.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), landmarks.contiguous(), mask, p, deterministic
    )
    return out, Routing(expert_index, key_index)
