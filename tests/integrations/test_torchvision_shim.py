"""timm, transformers and the timm example of docs/api.md work outside pytest (without tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_BEFORE = """
try:
    import torchvision  # noqa: F401
    broken = False
except RuntimeError as err:
    broken = "torchvision::nms" in str(err)
"""
_AFTER = """
import json
from transformers import BertModel  # noqa: F401
from mita.integrations import torchvision_shim
print(json.dumps({"broken": broken, "applied": torchvision_shim.install()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm")
def test_docs_timm_example_and_transformers_run_outside_pytest(tmp_path):
    """One fresh interpreter in an empty directory (no conftest): the docs' timm example prints what it
    claims, then transformers imports; the workaround is applied exactly where torchvision is broken."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    timm_blocks = [b for b in blocks if "import_timm" in b]
    assert len(timm_blocks) == 1
    block = timm_blocks[0]
    code = _BEFORE + block + _AFTER
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for line in (ln[2:].strip() for ln in block.splitlines() if ln.startswith("# ")):
        assert line in res.stdout
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["applied"] == got["broken"]
