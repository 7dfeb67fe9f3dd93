"""Facts recorded with every result: hardware, software versions, peak memory."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch


def hardware(device: torch.device) -> dict[str, Any]:
    """The machine a run used: CPU model and count, threads, GPU name, platform."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_model(),
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: CUDA peak allocated on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        import resource

        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return int(rss_kib) * 1024, "cpu_peak_rss"
    except ImportError:  # pragma: no cover - non-POSIX
        return 0, "unavailable"
