"""Test-only set-up shared by all test directories.

PyPI's torchvision is a CUDA build; on a CPU-only machine ``import torchvision`` (hence ``import timm`` /
``import transformers``) fails with "operator torchvision::nms does not exist". The tests import timm and
transformers directly, so the library's opt-in workaround (:mod:`mita.integrations.torchvision_shim`,
which users call through ``import_timm()``) is applied once here for the whole session. Nothing happens
when torchvision is absent or healthy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mita.integrations import torchvision_shim

torchvision_shim.install()

RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.fixture
def results_script():
    """``load(name)``: the script ``results/NAME.py`` as a fresh module (the scripts are not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"results_{name}", RESULTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
