"""``mita_attention``: the public functional op and its backend dispatch."""

from __future__ import annotations

import torch

from .checks import validate
from .reference import reference_forward
from .routing import Routing
from .torch_backend import torch_forward


def triton_available() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and if not, why."""
    try:
        from .triton_backend import availability
    except ImportError as err:  # pragma: no cover - depends on the install
        return False, f"the Triton backend could not be imported ({err})"
    return availability()


# The Triton kernels pass every test under the interpreter but have not yet run on a GPU, so "auto"
# keeps to the torch backend until `pytest -m gpu tests/ops/test_triton.py` has passed on real hardware.
AUTO_USES_TRITON = False


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if AUTO_USES_TRITON and device.type == "cuda" and triton_available()[0]:
            return "triton"
        return "torch"
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
            A row whose keys are all padding is an error.
        backend: ``"reference"`` (dense, the definition), ``"torch"`` (expert-major, no N x N tensor),
            ``"triton"`` (fused GPU kernels) or ``"auto"`` (torch for now; Triton on CUDA once the kernels
            are validated on a GPU, see ``AUTO_USES_TRITON``).
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
    else:
        from .triton_backend import triton_forward

        out, routing = triton_forward(p, q, k, v, landmarks, key_padding_mask)
    return (out, routing) if return_routing else out
