"""Wall-clock timing shared by every benchmark (``mita bench``, ``--causal`` / ``--decode`` and the GPU
grid script): one call timed with the device work it queued, and the best of repeated calls."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["SLOW_CALL_S", "synchronize", "time_call", "best_time"]

# One call slower than this is measured once, without warm-up: at that length warm-up changes nothing.
SLOW_CALL_S = 10.0


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously; the CPU needs nothing)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds one call of ``fn`` takes, the device work it queued included."""
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def best_time(
    fn: Callable[[], object], reps: int, device: str | torch.device = "cpu", *, slow_s: float = SLOW_CALL_S
) -> tuple[float, int]:
    """``(seconds, calls timed)``: the best of ``reps`` (at least one) calls after a warm-up call; a warm-up
    slower than ``slow_s`` is the measurement itself (one call)."""
    first = time_call(fn, device)
    if first >= slow_s:
        return first, 1
    times = [time_call(fn, device) for _ in range(max(1, reps))]
    return min(times), len(times)
