"""Where this process runs: the device, and the process group of ``torchrun`` (DDP: gloo on CPU, nccl on
CUDA; a single process otherwise)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mita.distributed.sequence import ContextParallelSequence
from mita.system import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables are present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_device(name: str) -> torch.device:
    """:func:`mita.system.resolve_device`, then with torchrun on CUDA the local rank's GPU (made current)."""
    device = resolve_device(name)
    if device.type == "cuda":
        if device.index is None and launched_by_torchrun():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def setup(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (no-op without torchrun or with one process)."""
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def teardown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small tensor over ranks (identity in a single process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of a small tensor over ranks (identity in a single process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_object(obj: object, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank (used for errors and decisions made on rank 0 only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if info.enabled:
        dist.barrier()


def data_parallel(info: DistInfo, context_parallel: int) -> tuple[int, int]:
    """``(replicas, replica)`` of the data: the ranks of one context-parallel group (``context_parallel``
    consecutive ranks) share their batches. ValueError when the world size is not a multiple."""
    if context_parallel > 1 and (not info.enabled or info.world_size % context_parallel):
        raise ValueError(
            f"--context-parallel {context_parallel} needs torchrun with a multiple of {context_parallel} "
            f"processes, got {info.world_size}"
        )
    return info.world_size // context_parallel, info.rank // context_parallel


def context_parallel(model: torch.nn.Module, info: DistInfo, size: int) -> torch.nn.Module:
    """``model`` split across groups of ``size`` consecutive ranks (:mod:`mita.distributed`), or itself."""
    if size == 1:
        return model

    data_parallel(info, size)
    # every rank creates every group, in the same order (torch.distributed requires it)
    groups = [dist.new_group(list(range(i, i + size))) for i in range(0, info.world_size, size)]
    return ContextParallelSequence(model, groups[info.rank // size])
