"""``mita_causal_attention``: the causal MiTA op (SPEC §5), its validation and its backend choice."""

from __future__ import annotations

import torch

from ..cpu.build import warn_fallback_once
from .common import CausalProblem, CausalRouting, validate_causal
from .cpu_backend import causal_kernel_available, cpu_causal_forward
from .nonfinite import bad_tokens, finite_or_zero, poison, poisoned_rows
from .reference import causal_reference_forward
from .torch_backend import causal_torch_forward


def _resolve_causal_backend(backend: str, p: CausalProblem, device: torch.device) -> str:
    """``"cpu"`` / ``"auto"``: the fused frozen-horizon kernels where they run."""
    if backend == "cpu":
        if p.horizon != "frozen":
            raise ValueError(
                "backend='cpu' of the causal op supports landmark_horizon='frozen' only, got "
                f"{p.horizon!r}; use backend='torch' or 'auto' for 'prefix'"
            )
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' is unavailable: inputs are on {device}, not the CPU")
        ok, why = causal_kernel_available()
        if not ok:
            raise RuntimeError(f"backend='cpu' is unavailable: {why}")
        return "cpu"
    if backend == "auto":
        if device.type == "cpu" and p.horizon == "frozen" and not p.grouped:
            ok, why = causal_kernel_available()
            if ok:
                return "cpu"
            warn_fallback_once(why)
        return "torch"
    return backend


def mita_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    block_size: int,
    landmark_horizon: str,
    experts_per_query: int = 1,
    scale: float | None = None,
    landmark_scale: float | None = None,
    shared: bool = True,
    routed: bool = True,
    backend: str = "auto",
    return_routing: bool = False,
    router_gate: bool = False,
    grouped: bool = False,
    dedup: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, CausalRouting]:
    """Causal Mixture-of-Top-k attention (SPEC §5): output ``i`` depends on tokens ``<= i`` only.

    Queries form blocks of ``b = block_size``; query ``i`` sits in block ``beta(i) = i // b``, and the
    ``n_l = N // b`` landmarks are one per complete block (landmark ``j`` summarises block ``j``, e.g.
    :func:`mita.landmarks.block_mean` of ``q``) and serve only later blocks. Each landmark ``j`` has a
    horizon of keys ``H_j(beta)``: ``"prefix"``, every key before the serving query's block
    (``t < beta * b``); ``"frozen"``, the keys up to the end of its own block (``t < (j + 1) b``). Over
    its horizon it has a top-k key set ``T_j = top-k_t (c r_j . k_t)`` (masked before selection) and a
    shared value ``A_j = sum_{t in H_j} softmax_t(c r_j . k_t) v_t``. Query ``i``'s experts are its
    ``s`` best landmarks ``e_1(i) .. e_s(i) = top-s_{j < beta(i)} q_i . r_j``, and its output is ONE
    softmax over three disjoint parts::

        o_i = softmax( [lambda q_i . r_j]_{j < beta(i)}                          shared expert
                       ++ [c q_i . k_t]_{t in T_e(i), e in e_1(i) .. e_s(i)}     routed experts
                       ++ [c q_i . k_t]_{beta(i) b <= t <= i} )                  own block, causal
              @ ( [A_j] ++ [v_t] ++ [v_t] )

    Block 0 has no landmark and attends to its own block only: with ``N <= b`` this is exactly causal
    softmax attention. The dense definition is :func:`mita.ops.causal.reference.causal_reference_forward`;
    decoding one token (or chunk) at a time is :class:`mita.MiTACache`. The non-causal op is
    :func:`mita.mita_attention`.

    Args:
        q: queries ``[B, H, N, d]``.
        k, v: keys and values ``[B, Hkv, N, d]`` / ``[B, Hkv, N, dv]``, as long as ``q`` (self-attention),
            ``H % Hkv == 0`` (grouped-query attention).
        landmarks: ``[B, H, N // block_size, d]``, row ``j`` the summary of block ``j``; gradients flow
            into them through the shared logits and values.
        topk: ``k``, keys per routed expert, ``>= 1``; may exceed the visible keys (then every visible key
            is taken).
        block_size: ``b``, the landmark (and own-block) block size, ``>= 1``.
        landmark_horizon: ``"prefix"`` or ``"frozen"`` (above; SPEC §5.2).
        experts_per_query: ``s``, routed experts per query, ``>= 1`` (a query with fewer earlier landmarks
            uses all of them).
        scale: ``c`` for key logits and landmark scores, default ``d ** -0.5``.
        landmark_scale: ``lambda`` for the landmark logits, default ``1 / d``.
        shared, routed: keep the shared / routed experts (SPEC §2.5's ablations; not both off).
        backend: ``"reference"`` (dense definition), ``"torch"`` (block-major, every device and horizon,
            never ``N x N``), ``"cpu"`` (fused C++ kernels, ``landmark_horizon="frozen"`` only;
            ``RuntimeError`` when they cannot be built, ``ValueError`` for ``"prefix"``) or ``"auto"``
            (``"cpu"`` for the frozen horizon on a CPU device when the kernels are available, else
            ``"torch"``; ``"prefix"`` always runs on ``"torch"``). ``"triton"`` has no causal path
            (``ValueError``).
        return_routing: also return the :class:`mita.ops.causal.CausalRouting` (indices, no gradient).
        router_gate: the straight-through router gate (:func:`.common.router_gate_shift`): the forward
            pass is unchanged bit for bit; in the backward each query's routing logits ``q . r_j`` also
            receive the summed gradient of its routed logits (through ``log softmax_j(lambda q . r_j)``
            at the chosen expert), so the router learns which landmark's keys help. Every backend
            carries it.
        grouped: a training mode (``"frozen"``, one expert, ``routed=True``, no ``router_gate``; runs on
            ``"reference"``/``"torch"``, and ``"auto"`` picks ``"torch"``): the routed part takes every
            visible landmark's key set, each set's logits shifted by ``log pi_i(j)``, Landmark
            Attention's grouped softmax. It changes the forward pass; inference routes by the argmax.
        dedup, key_padding_mask: not supported (``ValueError``): keys of several experts are
            concatenated, and padding belongs at the end (causality already hides later positions).

    Returns:
        ``[B, H, N, dv]`` in ``q``'s dtype, or ``(output, CausalRouting)`` with ``return_routing``.

    Raises:
        ValueError: on inconsistent shapes, dtypes, devices, sizes or options (the message names them).
        RuntimeError: when ``backend="cpu"`` is unavailable here (the message says why).
    """
    p = validate_causal(
        q,
        k,
        v,
        landmarks,
        topk=topk,
        block_size=block_size,
        landmark_horizon=landmark_horizon,
        experts_per_query=experts_per_query,
        scale=scale,
        landmark_scale=landmark_scale,
        shared=shared,
        routed=routed,
        dedup=dedup,
        key_padding_mask=key_padding_mask,
        backend=backend,
        router_gate=router_gate,
        grouped=grouped,
    )
    chosen = _resolve_causal_backend(backend, p, q.device)
    # Non-finite inputs are excluded by selection (see nonfinite.py): every backend runs on finite copies
    # and the rows that read a NaN/Inf become NaN, so nothing leaks to earlier rows, in either direction.
    bad = [bad_tokens(t) for t in (q, k, v, landmarks)]
    # On a CPU device, eager mode, asking whether any token is non-finite costs no device sync, and the
    # common all-finite call then skips the copies and the fill (the same result, bit for bit).
    guard = (
        q.device.type != "cpu"
        or torch.compiler.is_compiling()
        or bool(torch.stack([b.any() for b in bad]).any())
    )
    if guard:
        q, k, v, landmarks = (finite_or_zero(t, b) for t, b in zip((q, k, v, landmarks), bad))
    want_routing = return_routing or (
        guard and not p.shared
    )  # routed-only rows read what their routing chose
    if chosen == "reference":
        out, routing = causal_reference_forward(p, q, k, v, landmarks)
    elif chosen == "cpu":
        out, routing = cpu_causal_forward(p, q, k, v, landmarks, want_routing)
    else:
        out, routing = causal_torch_forward(p, q, k, v, landmarks, want_routing)
    if guard:
        out = poison(out, poisoned_rows(p, *bad, routing))
    return (out, routing) if return_routing else out
