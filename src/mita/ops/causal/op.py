"""``causal_attention``: validation and backend choice of ``mita_attention(..., causal=True)``."""

from __future__ import annotations

import torch

from .common import CausalRouting, validate_causal
from .reference import causal_reference_forward
from .torch_backend import causal_torch_forward


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
) -> torch.Tensor | tuple[torch.Tensor, CausalRouting]:
    """Causal MiTA (SPEC §5); see :func:`mita.mita_attention` for the arguments.

    ``backend``: ``"reference"`` (dense definition) or ``"torch"`` / ``"auto"`` (block-major, the
    fast path on every device). Other backends have no causal path and raise ``ValueError``.
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
    )
    if backend == "reference":
        out, routing = causal_reference_forward(p, q, k, v, landmarks)
    else:
        out, routing = causal_torch_forward(p, q, k, v, landmarks, return_routing)
    return (out, routing) if return_routing else out
