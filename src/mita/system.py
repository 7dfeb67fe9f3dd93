"""The machine a command runs on, and the option types every command shares.

Device resolution (``--device auto|cpu|cuda[:N]``), the facts recorded with every result (CPU model,
hardware, peak memory) and the ``argparse`` types for sizes and lists of sizes. A leaf: it imports
nothing from mita, so training, evaluation, analysis and the benchmarks all use the same definitions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

import torch

try:  # POSIX only: peak resident set size
    import resource
except ImportError:  # pragma: no cover - non-POSIX
    resource = None  # type: ignore[assignment]

__all__ = [
    "resolve_device",
    "cpu_model",
    "hardware",
    "peak_memory",
    "positive_int",
    "parse_int_list",
]


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or a torch device that exists on this machine;
    ValueError naming the ``--device`` option otherwise."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware(device: torch.device) -> dict[str, Any]:
    """The machine a run used: CPU model and count, threads, GPU name, platform."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: CUDA peak allocated on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    if resource is None:  # pragma: no cover - non-POSIX
        return 0, "unavailable"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(rss_kib) * 1024, "cpu_peak_rss"


def positive_int(text: str) -> int:
    """``argparse`` type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_int_list(text: str, name: str) -> list[int]:
    """``"1,4,9"`` -> ``[1, 4, 9]``; ValueError naming the option ``name`` on anything else (a value that
    is not an integer, or one below 1)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return values
