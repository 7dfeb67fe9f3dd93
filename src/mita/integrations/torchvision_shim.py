"""Make ``import timm`` / ``import transformers`` work on a CPU machine with PyPI's CUDA-only torchvision.

PyPI has one torchvision for torch 2.13 (0.28.0), a CUDA build: on a machine with the CPU torch its C++
extension cannot load (it links ``libtorch_cuda``), so ``import torchvision`` fails with "operator
torchvision::nms does not exist", and with it ``import timm`` and ``from transformers import ...``. timm
cannot do without torchvision (it imports ``torchvision.ops.misc`` at start-up), and a CPU torchvision
wheel is not on the package index, so there is no install that fixes this.

:func:`install` is the smallest workaround: when (and only when) torchvision is installed and fails in
exactly that way, it defines the schemas of the two ops torchvision's Python code looks up at import
(``torchvision::nms`` and ``torchvision::qnms``) and forgets the half-imported torchvision, so the next
import succeeds. Those ops (and torchvision's other C++ ops: ``roi_align``, ``deform_conv2d``, ...) still
have no kernel and raise if called; ViTs, timm's model zoo without detection heads, and transformers'
encoders never call them. Nothing happens where torchvision is healthy or absent. It is opt-in: mita
calls it only from its timm/transformers entry points (:func:`import_timm`, :mod:`mita.integrations.hf`).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

_OPS = ("nms", "qnms")
_LIBRARY: torch.library.Library | None = None  # must stay alive for the process, or the schemas go


def install() -> bool:
    """Apply the workaround if torchvision is installed but broken as described; True if it was applied."""
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401, PLC0415 - optional, and the import under test
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    else:
        return False  # healthy
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in _OPS:
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True


def import_timm() -> ModuleType:
    """``import timm``, after :func:`install`; ImportError naming the extra when timm is not installed."""
    install()
    try:
        import timm  # noqa: PLC0415 - optional
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("timm is not installed: pip install 'mita[timm]'") from err
    return timm
