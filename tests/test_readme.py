"""The README's Python examples run as written and print what they claim."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert first[0].startswith("bash scripts/setup.sh && python3 results/fmnist.py --epochs 1")
    assert first[1].startswith("python3 -m pytest -q")
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "python3 -m pytest -q", "CI must run exactly the README's test command"


def test_readme_examples_run():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), {})
        claimed = [ln[2:].strip() for ln in block.splitlines() if ln.startswith("# ")]
        for line in claimed:
            assert line in out.getvalue(), f"README claims output {line!r}, got {out.getvalue()!r}"
