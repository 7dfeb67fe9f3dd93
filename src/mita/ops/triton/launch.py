"""Kernel launch with a fallback for GPUs with less shared memory than the default configuration needs.

The default blocks and ``num_stages`` were chosen for H100-class shared memory (up to 227 KiB per
block). On a smaller GPU Triton raises ``OutOfResources`` at launch; we then retry with one pipeline
stage, then with the loop-only blocks halved (blocks that do not change the grid or any buffer), and
remember what worked for that kernel and configuration.
"""

from __future__ import annotations

from typing import Any

_chosen: dict[tuple, dict[str, int]] = {}


def _fallbacks(consts: dict[str, Any], loop_blocks: tuple[str, ...]) -> list[dict[str, int]]:
    tries: list[dict[str, int]] = [{}, {"num_stages": 1}]
    halved = {name: consts[name] // 2 for name in loop_blocks if consts.get(name, 0) >= 32}
    if halved:
        tries.append({"num_stages": 1, **halved})
    return tries


def launch(kernel, grid: tuple[int, ...], args: tuple, consts: dict[str, Any], loop_blocks=()) -> None:
    """``kernel[grid](*args, **consts)``, retrying lighter configurations on ``OutOfResources``."""
    from triton.runtime.errors import OutOfResources

    key = (kernel, tuple(sorted((k, str(v)) for k, v in consts.items())))
    if key in _chosen:
        kernel[grid](*args, **{**consts, **_chosen[key]})
        return
    tries = _fallbacks(consts, tuple(loop_blocks))
    for i, extra in enumerate(tries):
        try:
            kernel[grid](*args, **{**consts, **extra})
        except OutOfResources:
            if i == len(tries) - 1:
                raise
            continue
        _chosen[key] = extra
        return
