"""``mita_attention``: the non-causal op (SPEC §2), its input validation and its backend choice; the causal
op mirrors this file in :mod:`.causal.api`."""

from __future__ import annotations

import torch

from .arguments import as_bool, as_experts, as_int, as_scale, check_attention_tensors
from .common import Problem, Routing
from .cpu import build as cpu_build
from .cpu_backend import cpu_forward
from .reference import reference_forward
from .torch_backend import torch_forward
from .triton import backend as triton_backend

BACKENDS = ("auto", "reference", "torch", "triton", "cpu")


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    experts_per_query: int,
    scale: float | None,
    landmark_scale: float | None,
    shared: bool,
    routed: bool,
    dedup: bool,
    key_padding_mask: torch.Tensor | None,
    backend: str,
) -> Problem:
    """Check shapes, dtypes, devices and options; return the resolved :class:`Problem`."""
    check_attention_tensors(q, k, v, landmarks)
    b, h, nq, d = q.shape
    _, hkv, nk, _ = k.shape
    m = landmarks.shape[2]
    if m < 1:
        raise ValueError(f"need at least one landmark, got landmarks shape {tuple(landmarks.shape)}")
    topk = as_int("topk", topk, 1, nk, what=f"N={nk}")
    s = as_int("experts_per_query", experts_per_query, 1, m, what=f"m={m}")
    (shared, routed), dedup = as_experts(shared, routed), as_bool("dedup", dedup)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    scale, landmark_scale = as_scale("scale", scale), as_scale("landmark_scale", landmark_scale)
    if key_padding_mask is not None:
        _check_mask(key_padding_mask, b, nk, q.device)
    return Problem(
        batch=b,
        heads=h,
        kv_heads=hkv,
        q_len=nq,
        kv_len=nk,
        head_dim=d,
        value_dim=v.shape[3],
        num_landmarks=m,
        topk=topk,
        experts_per_query=s,
        # float(d): under torch.jit.trace a shape is a tensor and d**-0.5 would be computed in float32
        scale=scale if scale is not None else float(d) ** -0.5,
        landmark_scale=landmark_scale if landmark_scale is not None else 1.0 / float(d),
        shared=shared,
        routed=routed,
        dedup=dedup,
    )


def _check_mask(mask: torch.Tensor, b: int, n: int, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"key_padding_mask must have shape [B, N] = [{b}, {n}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")
    if torch.compiler.is_compiling():
        # No host sync inside a compiled graph: the check runs on the device and raises RuntimeError
        # (on CUDA a device-side assert) with the same message, rather than giving NaN rows.
        torch._assert_async(
            ~mask.all(dim=1).any(), "key_padding_mask marks every key as padding in a batch row"
        )
    elif bool(mask.all(dim=1).any()):  # one host sync, only when a mask is given
        rows = mask.all(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"key_padding_mask marks every key as padding in batch rows {rows}")


def triton_available() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and if not, why."""
    return triton_backend.availability()


# The Triton kernels pass every test under the interpreter but have not yet run on a GPU, so "auto"
# keeps to the torch backend until `pytest -m gpu tests/ops/test_triton.py` has passed on real hardware.
AUTO_USES_TRITON = False


def cpu_available() -> tuple[bool, str]:
    """Whether the fused CPU kernel (``backend="cpu"``) is built and loaded here, and if not, why."""
    return cpu_build.availability()


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if AUTO_USES_TRITON and device.type == "cuda" and triton_available()[0]:
            return "triton"
        if device.type == "cpu":
            ok, why = cpu_available()
            if ok:
                return "cpu"
            cpu_build.warn_fallback_once(why)
        return "torch"
    if backend == "cpu":
        ok, why = cpu_available() if device.type == "cpu" else (False, f"inputs are on {device}, not the CPU")
        if not ok:
            raise RuntimeError(f"backend='cpu' is unavailable: {why}")
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(f"backend='triton' is unavailable: {why}")
    return backend


def mita_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    experts_per_query: int = 1,
    scale: float | None = None,
    landmark_scale: float | None = None,
    shared: bool = True,
    routed: bool = True,
    dedup: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_routing: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Routing]:
    """Mixture-of-Top-k attention (SPEC §2), a drop-in for ``F.scaled_dot_product_attention``.

    Each query attends, in one softmax, to the ``m`` landmarks (the shared expert, whose values are
    ``A = softmax(R K^T c) V``, with logits ``q . r_j * landmark_scale``) and to the ``topk`` keys chosen
    by each of its ``experts_per_query`` best landmarks (routed experts, logits ``q . k_t * scale``).
    Causal MiTA (SPEC §5) is its sibling op :func:`mita.mita_causal_attention`.

    Args:
        q: queries ``[B, H, N, d]``.
        k, v: keys and values ``[B, Hkv, N_kv, d]`` / ``[B, Hkv, N_kv, dv]``, with ``H % Hkv == 0``
            (grouped-query attention: query head ``h`` uses key/value head ``h // (H // Hkv)``).
        landmarks: ``[B, H, m, d]``, e.g. :func:`mita.landmarks.pool_1d` of ``q``. Gradients flow into
            them through both the shared logits and the shared values.
        topk: keys per routed expert, ``1 <= topk <= N_kv``.
        experts_per_query: routed experts per query ``s``, ``1 <= s <= m`` (best landmarks by ``q . r``).
        scale: ``c`` for key logits and landmark scores, default ``d ** -0.5``.
        landmark_scale: ``lambda`` for the landmark logits, default ``1 / d`` as the published code
            (``d ** -0.5`` is the paper's text).
        shared, routed: keep the shared / routed experts (SPEC §2.5 ablations; not both off).
        dedup: with ``s > 1``, count a key chosen by several of a query's experts once (default: the
            paper's concatenation, where it appears once per expert).
        key_padding_mask: ``[B, N_kv]`` bool, True = padding. Padded keys are never selected, never in
            ``A`` and never attended. Padded *query* rows are computed like any other query (they
            attend to the real keys); their outputs are meaningful but usually ignored by the caller.
            Padded keys and values are excluded by selection, so a NaN/Inf there reaches no output or
            gradient. A row whose keys are all padding is an error: ValueError in eager mode; under
            ``torch.compile`` a RuntimeError from a device-side check (``torch._assert_async``).
        backend: ``"reference"`` (dense, the definition), ``"torch"`` (expert-major, no N x N tensor),
            ``"cpu"`` (fused C++ kernel, built on first use; needs a compiler and ninja),
            ``"triton"`` (fused GPU kernels) or ``"auto"`` (on CPU: ``"cpu"`` when it builds, else torch
            with one warning; on CUDA: torch for now, Triton once the kernels are validated on a GPU, see
            ``AUTO_USES_TRITON``).
        return_routing: also return :class:`Routing` (``expert_index`` [B, H, N, s] and ``key_index``
            [B, H, m, k]); indices carry no gradient.

    Returns:
        ``[B, H, N, dv]`` output in ``q``'s dtype, or ``(output, Routing)``.

    Raises:
        ValueError: on inconsistent shapes, dtypes, devices, sizes or options (the message names them).
        RuntimeError: when the requested backend is unavailable here (the message says why).
    """
    p = validate(
        q,
        k,
        v,
        landmarks,
        topk=topk,
        experts_per_query=experts_per_query,
        scale=scale,
        landmark_scale=landmark_scale,
        shared=shared,
        routed=routed,
        dedup=dedup,
        key_padding_mask=key_padding_mask,
        backend=backend,
    )
    chosen = _resolve_backend(backend, q.device)
    if chosen == "reference":
        out, routing = reference_forward(p, q, k, v, landmarks, key_padding_mask)
    elif chosen == "torch":
        out, routing = torch_forward(p, q, k, v, landmarks, key_padding_mask)
    elif chosen == "cpu":
        out, routing = cpu_forward(p, q, k, v, landmarks, key_padding_mask)
    else:
        out, routing = triton_backend.triton_forward(p, q, k, v, landmarks, key_padding_mask)
    return (out, routing) if return_routing else out
