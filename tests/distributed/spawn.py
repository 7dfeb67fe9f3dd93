"""Run a function on P spawned gloo processes (127.0.0.1, a free port) and collect each rank's result."""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=_TIMEOUT
    )
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes with a gloo group; their JSON results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the children need not import torch again (seconds per process on a small machine)
        mp.start_processes(
            _entry, args=(world, free_port(), fn, args, out_dir), nprocs=world, start_method="fork"
        )
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"{r}.json")) as f:
                results.append(json.load(f))
    return results
