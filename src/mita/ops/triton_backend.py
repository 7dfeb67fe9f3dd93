"""The ``"triton"`` backend: fused Triton kernels for MiTA forward and backward (design in docs/triton.md).

Forward, per call:
1. landmark kernel: one pass over K and V gives the scores ``R K^T c`` (then ``torch.topk`` picks each
   landmark's keys) and the shared values ``A = softmax(R K^T c) V``;
2. routing: ``Q R^T`` once (float32), used for the argmax expert and, later, the shared logits;
3. queries are packed into fixed-size tiles sharing one expert (device sort, static tile count, no
   host sync) and the attention kernel runs one online softmax per tile over the ``m`` shared entries
   and the expert's ``k`` keys, loaded by index.

Backward: the routed part (dQ per tile; dK/dV scattered atomically, or deterministically when
``torch.are_deterministic_algorithms_enabled()``) runs in Triton; the shared logits and the landmark
side (gradients into A, R, K, V) are small ``m x N`` matmuls done with torch ops in float32.

Only ``s = 1`` and float32/float16/bfloat16 run in the kernels; ``experts_per_query > 1`` (with or
without ``dedup``) and float64 fall back to the torch backend with a one-time warning.
``import triton`` happens only when this backend is used.
"""

from __future__ import annotations

import os
import warnings

import torch

from .checks import Problem
from .routing import Routing
from .torch_backend import _Tiles, default_tile_size, torch_forward

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
    from .triton import attention, landmark

    return landmark, attention


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from .triton import attention

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
    tiles = _Tiles(experts, bh * m, tile)
    return tiles.expert.contiguous(), tiles.pair.contiguous(), tiles.valid.to(torch.uint8).contiguous()


def _landmark_backward(
    p: Problem,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    values: torch.Tensor,
    d_values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``A = softmax(R K^T c) V`` given dA, in float32: (dR, dK, dV)."""
    b, h, m, d = r.shape
    g, hkv, dv = p.group, p.kv_heads, v.shape[3]
    rg = r.float().reshape(b, hkv, g * m, d)
    kf, vf = k.float(), v.float()
    scores = (rg @ kf.transpose(-1, -2)) * p.scale
    if mask is not None:
        scores = scores.masked_fill(mask.bool()[:, None, None, :], float("-inf"))
    prob = torch.softmax(scores, dim=-1)  # [B, Hkv, g*m, N]
    d_a = d_values.reshape(b, hkv, g * m, dv)
    a = values.reshape(b, hkv, g * m, dv)
    dv_l = prob.transpose(-1, -2) @ d_a
    ds = prob * (d_a @ vf.transpose(-1, -2) - (d_a * a).sum(-1, keepdim=True))
    dr = ((ds @ kf) * p.scale).reshape(b, h, m, d)
    dk = (ds.transpose(-1, -2) @ rg) * p.scale
    return dr, dk, dv_l


class _MitaTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, r, mask, p: Problem, deterministic: bool):  # noqa: D102
        landmark, attention = _kernels()
        scores, values, _ = landmark.landmark_forward(r, k, v, mask, p.scale)
        key_index = scores.topk(p.topk, dim=-1, sorted=False).indices.contiguous()
        del scores
        if q.dtype == torch.float32:
            qr = q @ r.transpose(-1, -2)  # the very op of routing.query_side: identical argmax
        else:
            qr = q.float() @ r.float().transpose(-1, -2)  # half types: route on float32 logits
        qr = qr.contiguous()
        expert_index = qr.topk(1, dim=-1).indices
        tile_expert, tile_rows, tile_ok = _tiling(p, expert_index)
        out, lse = attention.attention_forward(
            q, k, v, qr, values, key_index, mask, tile_expert, tile_rows, tile_ok,
            scale=p.scale, lam=p.landmark_scale, shared=p.shared, routed=p.routed,
        )  # fmt: skip
        tiling = (tile_expert, tile_rows, tile_ok)
        ctx.save_for_backward(q, k, v, r, mask, values, qr, key_index, *tiling, out, lse)
        ctx.p, ctx.deterministic = p, deterministic
        ctx.mark_non_differentiable(expert_index, key_index)
        return out, expert_index, key_index

    @staticmethod
    def backward(ctx, d_out, _d_expert, _d_keys):  # noqa: D102
        q, k, v, r, mask, values, qr, key_index, tile_expert, tile_rows, tile_ok, out, lse = ctx.saved_tensors
        p: Problem = ctx.p
        _, attention = _kernels()
        do = d_out.contiguous()
        delta = (do.float() * out.float()).sum(-1)  # [B, H, N]: rowsum(dO * O) of the one softmax
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        dr = torch.zeros(r.shape, device=q.device, dtype=torch.float32)
        if p.routed:
            dq, dk, dv = attention.attention_backward(
                q, k, v, do, lse, delta, key_index, mask, tile_expert, tile_rows, tile_ok,
                scale=p.scale, deterministic=ctx.deterministic,
            )  # fmt: skip
        if p.shared:
            # Shared logits qr * lambda share the softmax normaliser lse with the routed keys.
            prob = torch.exp(qr * p.landmark_scale - lse.unsqueeze(-1))  # [B, H, N, m]
            dof = do.float()
            d_values = prob.transpose(-1, -2) @ dof  # [B, H, m, dv]
            d_qr = prob * (dof @ values.transpose(-1, -2) - delta.unsqueeze(-1)) * p.landmark_scale
            dq = dq + d_qr @ r.float()
            dr = dr + d_qr.transpose(-1, -2) @ q.float()
            dr_l, dk_l, dv_l = _landmark_backward(p, r, k, v, mask, values, d_values)
            dr, dk, dv = dr + dr_l, dk + dk_l, dv + dv_l
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
