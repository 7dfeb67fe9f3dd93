"""The ``"triton"`` backend's entry point: can it run here, and what runs in the kernels.

:func:`triton_forward` is what ``mita.ops.api`` calls. It sends what the kernels do not cover to the
torch backend with a one-time warning (``experts_per_query > 1``, with or without ``dedup``, and
float64), checks the device, and runs :func:`.parallel.parallel_mita`. This module does not import
``triton``: :func:`availability` must answer where it is missing, and the kernels load on first use.
The design is in docs/triton.md.
"""

from __future__ import annotations

import warnings

import torch

from ..common import Problem, Routing
from ..torch_backend import torch_forward
from .interpreter import interpreter_requested

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_fallback(kind: str, why: str) -> None:
    """Warn once per kind of reason that a call runs on the torch backend instead of the kernels."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"backend='triton' uses the torch backend for {why}; warned once", stacklevel=4)


def availability() -> tuple[bool, str]:
    """``(ok, reason)``: can the Triton kernels run here (CUDA, or CPU under ``TRITON_INTERPRET=1``)?"""
    try:
        import triton  # noqa: F401, PLC0415 - optional
    except ImportError as err:
        return False, f"triton is not installed ({err}); install the extra: pip install 'mita[triton]'"
    if torch.cuda.is_available():
        return True, "triton and a CUDA device are available"
    if interpreter_requested():
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors in the Triton interpreter (slow)"
    return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU in the Triton interpreter)"


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415 - optional

        from .parallel import attn_fwd_kernel  # noqa: PLC0415 - imports triton (optional), kernels on first use

        if isinstance(attn_fwd_kernel.fn, InterpretedFunction):
            return
        raise RuntimeError(
            "backend='triton' got CPU tensors but the kernels were not built for the Triton interpreter; "
            "set TRITON_INTERPRET=1 before mita's Triton kernels are first imported"
        )
    raise RuntimeError(f"backend='triton' needs CUDA tensors (or CPU and TRITON_INTERPRET=1), got {t.device}")


def triton_forward(
    p: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, Routing]:
    """MiTA through the Triton kernels (same contract as the other backends' ``*_forward``)."""
    if p.experts_per_query > 1:
        _warn_fallback("s", f"experts_per_query={p.experts_per_query} (the kernels run s = 1 only)")
        return torch_forward(p, q, k, v, landmarks, key_padding_mask)
    if q.dtype not in _KERNEL_DTYPES:
        _warn_fallback("dtype", f"dtype {q.dtype} (the kernels run float32, float16 and bfloat16)")
        return torch_forward(p, q, k, v, landmarks, key_padding_mask)
    _check_device(q)
    from .parallel import parallel_mita  # noqa: PLC0415 - imports triton (optional), kernels on first use

    return parallel_mita(p, q, k, v, landmarks, key_padding_mask)
