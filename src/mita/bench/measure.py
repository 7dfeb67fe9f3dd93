"""One measurement: a method at one size, forward or forward+backward, its time and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..landmarks import pool_1d, pool_2d
from ..ops import mita_attention
from ..system import peak_memory
from .timing import best_time


@dataclass(frozen=True)
class Case:
    """What to run: shape, MiTA sizes, method ("sdpa" or "mita-<backend>") and mode ("fwd" | "fwdbwd")."""

    method: str
    mode: str
    n: int
    batch: int
    heads: int
    dim: int
    landmarks: int
    topk: int
    dtype: str
    device: str
    reps: int = 3
    grid: tuple[int, int] | None = None  # vision layout: cls + h x w patches pooled in 2-D
    threads: int = 0  # torch.set_num_threads for this case; 0 keeps torch's default


def useful_flops(c: Case) -> float:
    """Matmul FLOPs the method needs for ``c`` (its own work, not a dense equivalent).

    Per batch and head, forward: SDPA 2 N^2 (d + dv); MiTA 2 N (d + dv) (2m + k), counting R K^T and
    A = P V (landmark side), Q R^T and its shared output, and Q K_t^T and P V_t over each query's k
    routed keys. Forward+backward counts the backward as twice the forward (its matmuls, without
    the recomputation some kernels do), for every method alike.
    """
    d2 = 2 * c.dim  # d + dv, with dv = d here
    if c.method == "sdpa":
        fwd = 2.0 * c.n * c.n * d2
    else:
        fwd = 2.0 * c.n * d2 * (2 * c.landmarks + c.topk)
    return fwd * c.batch * c.heads * (3 if c.mode == "fwdbwd" else 1)


def _inputs(c: Case) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, c.dtype)
    shape = (c.batch, c.heads, c.n, c.dim)
    return tuple(
        torch.randn(shape, generator=g).to(device=c.device, dtype=dtype).requires_grad_(c.mode == "fwdbwd")
        for _ in range(3)
    )


def _landmarks(c: Case, q: torch.Tensor) -> torch.Tensor:
    if c.grid is not None:
        side = int(round(c.landmarks**0.5))
        return pool_2d(q, c.grid, (side, side), prefix=c.n - c.grid[0] * c.grid[1])
    return pool_1d(q, c.landmarks)


def _runner(c: Case):
    q, k, v = _inputs(c)
    grad = torch.ones_like(q) if c.mode == "fwdbwd" else None
    if c.method == "sdpa":

        def fwd() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)
    else:
        backend = c.method.split("-", 1)[1]

        def fwd() -> torch.Tensor:
            return mita_attention(q, k, v, _landmarks(c, q), topk=c.topk, backend=backend)

    def step() -> None:
        if grad is None:
            with torch.no_grad():
                fwd()
        else:
            fwd().backward(grad)
            for t in (q, k, v):
                t.grad = None

    return step


def _rss_bytes() -> int:
    return peak_memory(torch.device("cpu"))[0]


def run_case(c: Case) -> dict:
    """Time ``c`` in this process; the memory figure is the rise of the peak over the inputs' footprint."""
    cuda = c.device.startswith("cuda")
    if c.threads:
        torch.set_num_threads(c.threads)
    step = _runner(c)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    seconds, timed = best_time(step, c.reps, c.device)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes()
    return {
        **asdict(c),
        "time_s": seconds,
        "tflops": useful_flops(c) / seconds / 1e12,
        "gflops": useful_flops(c) / seconds / 1e9,
        "reps_timed": timed,
        "peak_mem_rise_bytes": max(0, peak - base),
    }


def run_isolated(c: Case, timeout_s: float | None = None) -> dict:
    """Run ``c`` in a fresh Python process (so its max-RSS rise is its own); errors come back as a field."""
    cmd = [sys.executable, "-m", "mita.bench.measure", json.dumps(asdict(c))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {**asdict(c), "error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**asdict(c), "error": tail[0][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main_worker(arg: str) -> None:
    spec = json.loads(arg)
    if spec.get("grid") is not None:
        spec["grid"] = tuple(spec["grid"])
    print(json.dumps(run_case(Case(**spec))))


if __name__ == "__main__":
    _main_worker(sys.argv[1])
