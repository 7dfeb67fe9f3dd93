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


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the end of a run (a figure not measured reads n/a)."""

    def num(key: str, fmt: str, scale: float = 1.0) -> str:
        value = summary.get(key)
        return "n/a" if value is None else format(value * scale, fmt)

    acc, best = num("test_accuracy", ".2f", 100), num("best_test_accuracy", ".2f", 100)
    lines = [
        f"task {summary['task']} attention {summary['attention']} (preset {summary['preset']}, "
        f"{summary['num_params'] / 1e6:.2f}M params)",
        f"test accuracy {acc}% (best {best}%), test loss {num('test_loss', '.4f')} "
        f"after {summary['steps']} steps ({summary['epochs']:.2f} epochs)",
        f"wall time {num('wall_time_s', '.1f')} s, train {num('train_samples_per_s', '.1f')} samples/s, "
        f"eval {num('eval_samples_per_s', '.1f')} samples/s, "
        f"peak memory {num('peak_memory_bytes', '.0f', 2**-20)} MiB ({summary.get('peak_memory_kind')})",
    ]
    if summary.get("test_bits_per_byte") is not None:
        lines.insert(2, f"test bits per byte {summary['test_bits_per_byte']:.4f}")
    if summary.get("test_miou") is not None:  # a segmenter: its accuracy above is pixel accuracy
        miou, base = num("test_miou", ".2f", 100), num("baseline_miou", ".2f", 100)
        lines.insert(2, f"test mIoU {miou}% (all-background {base}%)")
    return "\n".join(lines)
