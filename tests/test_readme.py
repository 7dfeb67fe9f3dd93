"""The README's Python examples run as written and print what they claim."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

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


# --- Every figure in the README's results table equals the file it names. ---------------------------

ROOT = README.parent


def _load(path: str):
    return json.loads((ROOT / path).read_text())


def _fmnist(path: str) -> tuple[list[float], list[float]]:
    acc = {r["attention"]: 100 * r["test_accuracy"] for r in _load(path)["runs"]}
    return [acc["mita"]], [acc["full"]]


def _finetune() -> tuple[list[float], list[float]]:
    acc = {
        r["attention"]: 100 * r["fine_tuned"]["test_accuracy"] for r in _load("results/finetune.json")["runs"]
    }
    return [acc["mita"]], [acc["full"]]


def _segmentation_miou() -> tuple[list[float], list[float]]:
    q = _load("results/segmentation.json")["quality"]
    return [100 * q["mita"]["miou"]], [100 * q["full"]["miou"]]


def _segmentation_speed() -> tuple[list[float], list[float]]:
    s = _load("results/segmentation.json")["speed"]
    return [s["mita"]["train_speedup_vs_full"]], [s["full"]["train_speedup_vs_full"]]


def _lra() -> tuple[list[float], list[float]]:
    r = _load("results/lra.json")["results"]
    return ([100 * r[kind][task]["test_accuracy"] for task in ("text", "image")] for kind in ("mita", "full"))


def _shakespeare() -> tuple[list[float], list[float]]:
    loss = {r["name"]: r["final"]["loss"] for r in _load("results/causal.json")["runs"]}
    name = "shakespeare-n1024-{}-s1000x8-seed{}"
    return ([loss[name.format(kind, seed)] for seed in (0, 1)] for kind in ("mita-frozen", "full"))


def _bench() -> tuple[list[float], list[float]]:
    rows = _load("docs/bench/bench.json")["results"]
    (row,) = [
        r
        for r in rows
        if (r["method"], r["mode"], r["n"], r["label"]) == ("mita-cpu", "fwdbwd", 16384, "seq")
    ]
    return [row["speedup_vs_sdpa"]], [1.0]


# README row label -> (the file the row must name, where its MiTA and full-attention figures come from)
RESULT_ROWS = {
    "Fashion-MNIST ViT, 197 tokens, 1 epoch (the main job)": (
        "results/fmnist.md",
        lambda: _fmnist("results/fmnist.json"),
    ),
    "Fashion-MNIST ViT, 197 tokens, 5 epochs": (
        "results/fmnist_5epochs.md",
        lambda: _fmnist("results/fmnist_5epochs.json"),
    ),
    "full-attention weights fine-tuned as MiTA, 1 epoch": ("results/finetune.md", _finetune),
    "segmentation at 1,024 tokens, mIoU (mean of 2 seeds)": ("results/segmentation.md", _segmentation_miou),
    "segmentation at 4,096 tokens, training speed": ("results/segmentation.md", _segmentation_speed),
    "long-range Text / Image at 1,024 tokens (short runs)": ("results/lra.md", _lra),
    "GPT on shakespeare-char, context 1,024, test loss (frozen horizon; seeds 0 / 1)": (
        "results/causal.md",
        _shakespeare,
    ),
    "the op at N = 16,384, fwd+bwd speed (fused CPU kernel)": ("docs/bench/bench.md", _bench),
}


def _results_rows() -> dict[str, list[str]]:
    section = README.read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] != "result" and set(cells[1]) - set("-: "):
            rows[cells[0]] = cells[1:]
    return rows


def _numbers(cell: str) -> list[tuple[float, int]]:
    """The numbers of a table cell with their decimal places ('1,024' is 1024; '3.40×' is 3.40, 2 places)."""
    found = re.findall(r"\d[\d,]*(?:\.(\d+))?", cell)
    values = re.findall(r"\d[\d,]*(?:\.\d+)?", cell)
    return [(float(v.replace(",", "")), len(places)) for v, places in zip(values, found)]


def _agrees(quoted: list[tuple[float, int]], actual: list[float]) -> bool:
    return len(quoted) == len(actual) and all(round(a, p) == q for (q, p), a in zip(quoted, actual))


def test_readme_results_rows_are_all_checked():
    rows = _results_rows()
    assert len(rows) >= 6, "the README's results table was not found"
    assert set(rows) == set(RESULT_ROWS), (
        f"rows without a check or checks without a row: {set(rows) ^ set(RESULT_ROWS)}"
    )


@pytest.mark.parametrize("label", sorted(RESULT_ROWS))
def test_readme_results_equal_their_files(label):
    mita_cell, full_cell, source = _results_rows()[label]
    path, figures = RESULT_ROWS[label]
    assert f"`{path}`" == source, f"{label!r} must name {path}"
    assert (ROOT / path).exists()
    mita, full = figures()
    for cell, actual in ((mita_cell, mita), (full_cell, full)):
        assert _agrees(_numbers(cell), actual), (
            f"README {label!r}: {cell!r}, but the data of {path} give {actual}"
        )
    if path.startswith("results/"):  # and the table it names shows that figure (maybe with more places)
        shown = _numbers((ROOT / path).read_text())
        for value, places in _numbers(mita_cell):
            assert any(p >= places and round(v, places) == value for v, p in shown), f"{path} lacks {value}"


def test_readme_mqar_router_figures_equal_docs():
    quoted = re.search(r"reaches ([\d. /]+) % MQAR accuracy", README.read_text()).group(1)
    table = (ROOT / "docs/causal.md").read_text()
    # "Teaching the landmarks' key selection": N = 512, the default router, one bold row per seed
    default = r"\*\*`gate\+distill\+select`\*\* \(default: `select_weight=0.3` at b = 64\)"
    rows = re.findall(rf"^\| 512, 32 \| {default} \| (\d) \| \*\*([\d.]+)\*\* \|", table, flags=re.M)
    actual = [float(acc) for _, acc in sorted(rows)]
    assert len(actual) == 3
    assert _agrees(_numbers(quoted), actual), f"README {quoted!r}, docs/causal.md {actual}"


def test_number_check_can_fail():
    assert _agrees(_numbers("75.11"), [75.11]) and _agrees(_numbers("3.40×"), [3.398])
    assert not _agrees(_numbers("75.88"), [75.11])
    assert not _agrees(_numbers("46.48 / 31.84"), [46.48])
    assert not _agrees(_numbers("1.836 / 1.842"), [1.8362, 1.8519])
