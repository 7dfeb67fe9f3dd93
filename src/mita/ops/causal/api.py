"""``causal_attention``: validation and backend choice of ``mita_attention(..., causal=True)``."""

from __future__ import annotations

import torch

from .common import CausalProblem, CausalRouting, validate_causal
from .nonfinite import bad_tokens, finite_or_zero, poison, poisoned_rows
from .reference import causal_reference_forward
from .torch_backend import causal_torch_forward


def _resolve_causal_backend(backend: str, p: CausalProblem, device: torch.device) -> str:
    """``"cpu"`` / ``"auto"`` with ``causal=True``: the fused frozen-horizon kernels where they run."""
    from ..cpu.build import availability, warn_fallback_once

    if backend == "cpu":
        if p.horizon != "frozen":
            raise ValueError(
                "backend='cpu' with causal=True supports landmark_horizon='frozen' only, got "
                f"{p.horizon!r}; use backend='torch' or 'auto' for 'prefix'"
            )
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' is unavailable: inputs are on {device}, not the CPU")
        ok, why = availability("mita_cpu_causal", probe="fwd")
        if not ok:
            raise RuntimeError(f"backend='cpu' is unavailable: {why}")
        return "cpu"
    if backend == "auto":
        if device.type == "cpu" and p.horizon == "frozen" and not p.grouped:
            ok, why = availability("mita_cpu_causal", probe="fwd")
            if ok:
                return "cpu"
            warn_fallback_once(why)
        return "torch"
    return backend


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    block_size: int = 64,
    landmark_horizon: str = "prefix",
    experts_per_query: int = 1,
    scale: float | None = None,
    landmark_scale: float | None = None,
    shared: bool = True,
    routed: bool = True,
    dedup: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_routing: bool = False,
    router_gate: bool = False,
    grouped: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, CausalRouting]:
    """Causal MiTA (SPEC §5); see :func:`mita.mita_attention` for the arguments.

    ``backend``: ``"reference"`` (dense definition), ``"torch"`` (block-major, every device and horizon),
    ``"cpu"`` (fused C++ kernels, ``landmark_horizon="frozen"`` only; ``RuntimeError`` when they cannot
    be built, ``ValueError`` for ``"prefix"``) or ``"auto"`` (``"cpu"`` for the frozen horizon on a CPU
    device when the kernels are available, else ``"torch"``; ``"prefix"`` always runs on ``"torch"``).
    Other backends have no causal path and raise ``ValueError``.

    ``router_gate``: the straight-through router gate (:func:`.common.router_gate_shift`): the forward
    pass is unchanged bit for bit; the backward also credits each query's routing logits ``q . r_j``
    with the summed gradient of its routed logits, so the router learns. Every backend carries it.

    ``grouped`` (a training mode, ``"frozen"`` with one expert; ``"reference"``/``"torch"``, and
    ``"auto"`` runs it on ``"torch"``): the routed part takes every visible landmark's key set, each
    set's logits shifted by ``log pi_i(j)``, Landmark Attention's grouped softmax. It changes the
    forward pass; inference then routes by the argmax as usual.
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
        from .cpu_backend import cpu_causal_forward

        out, routing = cpu_causal_forward(p, q, k, v, landmarks, want_routing)
    else:
        out, routing = causal_torch_forward(p, q, k, v, landmarks, want_routing)
    if guard:
        out = poison(out, poisoned_rows(p, *bad, routing))
    return (out, routing) if return_routing else out
