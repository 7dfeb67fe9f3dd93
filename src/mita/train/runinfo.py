"""The human-readable summary printed at the end of a run (the machine facts are in :mod:`mita.system`)."""

from __future__ import annotations

from typing import Any


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
