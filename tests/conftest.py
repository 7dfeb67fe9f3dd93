"""Test-only set-up shared by all test directories.

PyPI's torchvision is a CUDA build; on a CPU-only machine ``import torchvision`` (hence ``import timm`` /
``import transformers``) fails with "operator torchvision::nms does not exist". The tests import timm and
transformers directly, so the library's opt-in workaround (:mod:`mita.integrations.torchvision_shim`,
which users call through ``import_timm()``) is applied once here for the whole session. Nothing happens
when torchvision is absent or healthy.
"""

from __future__ import annotations

from mita.integrations import torchvision_shim

torchvision_shim.install()
