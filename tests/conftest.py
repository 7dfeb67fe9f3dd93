"""Test-only set-up shared by all test directories.

The PyPI torchvision is a CUDA build; on a CPU-only machine its C++ ops do not register and
``import torchvision`` (hence ``import timm`` / ``import transformers``) fails with "operator
torchvision::nms does not exist". When (and only when) that happens, this defines the two missing op
schemas and forgets the half-imported torchvision, so the next import succeeds and timm can build ViTs
(a ViT never calls these ops). Nothing happens when torchvision is absent or healthy. The shim stays out
of the library on purpose.
"""

from __future__ import annotations

import importlib.util
import sys

import torch


def _install_torchvision_shim() -> torch.library.Library | None:
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    else:
        return None  # healthy
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_SHIM = _install_torchvision_shim()  # the Library object must stay alive for the whole session
