"""The user-facing docs hold together: every "SPEC §N" cited has a section in docs/spec.md, every
``mita.…`` name the docs quote exists, and no text speaks of how the project was worked on."""

from __future__ import annotations

import builtins
import importlib
import re
from pathlib import Path

import pytest

import mita

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"


def _user_docs() -> list[Path]:
    docs = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "results").glob("*.md")),
    ]
    return [p for p in docs if p.is_file()]


def _citing_files() -> list[Path]:
    files = [*_user_docs(), ROOT / "scripts" / "setup.sh"]
    for folder, pattern in (("src", "*.py"), ("src", "*.cpp"), ("tests", "*.py"), ("results", "*.py")):
        files += sorted((ROOT / folder).rglob(pattern))
    return files


def _spec_sections(text: str) -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def _cited_sections(text: str) -> set[str]:
    """'SPEC §2.4' -> {'2.4'}; a range 'SPEC §2.4-2.7' -> {'2.4', '2.7'}; a list 'SPEC §3, §4' -> both."""
    cited = set()
    for run in re.findall(r"SPEC (§[\d.]+(?:\s*(?:-|–|,|and)\s*§?[\d.]+)*)", text):
        cited |= {n.rstrip(".") for n in re.findall(r"\d+(?:\.\d+)?", run)}
    return cited


def test_every_cited_spec_section_exists():
    sections = _spec_sections(SPEC.read_text())
    assert {"1", "2", "2.1", "2.2", "2.4", "2.5", "3", "4", "5", "5.1", "5.8"} <= sections
    missing = {}
    for path in _citing_files():
        for number in _cited_sections(path.read_text(errors="replace")) - sections:
            missing.setdefault(number, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"SPEC sections cited but not in docs/spec.md: {missing}"


def test_spec_citation_parsing_can_fail():
    assert _cited_sections("see SPEC §2.4-2.7 and SPEC §5.8.") == {"2.4", "2.7", "5.8"}
    assert _cited_sections("(SPEC §3, §4)") == {"3", "4"}
    assert "9" + ".9" in _cited_sections("SPEC §" + "9.9") - _spec_sections(
        SPEC.read_text()
    )  # split: not a citation


def test_package_docstring_points_to_the_spec():

    assert "docs/spec.md" in mita.__doc__ and "SPEC §" in mita.__doc__


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def _quoted_names() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for path in _user_docs():
        for code in re.findall(r"`([^`\n]+)`", path.read_text()):
            for dotted in re.findall(r"(?<![\w./])mita(?:\.[A-Za-z_]\w*)+", code):
                names.setdefault(dotted, []).append(str(path.relative_to(ROOT)))
    return names


def test_quoted_mita_names_exist():
    names = _quoted_names()
    assert len(names) > 20, "no mita.* names found in the docs"
    missing = {n: sorted(set(where)) for n, where in names.items() if not _resolves(n)}
    assert not missing, f"the docs quote names that do not exist: {missing}"


def test_name_check_can_fail():
    assert _resolves("mita.ops.common.ExpertTiles") and _resolves("mita.landmarks.pool_2d")
    assert not _resolves("mita.ops.torch_backend._Tiles")
    assert not _resolves("mita.distributed.NoSuchClass")


# Names from outside mita that the docs quote in code spans (builtins are allowed too).
EXTERNAL_NAMES = {"DistributedSampler", "OutOfResources", "SiLU", "NaN", "ViT", "MiB", "FlashAttention"}


def _defined_names() -> set[str]:
    text = "\n".join(p.read_text() for folder in ("src", "tests") for p in (ROOT / folder).rglob("*.py"))
    return set(re.findall(r"^\s*(?:class|def)\s+(\w+)", text, flags=re.M)) | set(
        re.findall(r"^\s*(\w+)\s*[:=]", text, flags=re.M)
    )


def _class_like(code: str) -> list[str]:
    """CamelCase or _private names in a code span, not after a dot (those are checked as mita.* paths)."""
    return re.findall(r"(?<![\w.*·-])(_?[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+|_[A-Za-z]\w{2,})(?![\w.])", code)


def test_quoted_class_names_exist():

    known = _defined_names() | EXTERNAL_NAMES | set(dir(builtins))
    missing = {}
    for path in _user_docs():
        for code in re.findall(r"`([^`\n]+)`", path.read_text()):
            for name in _class_like(code):
                if name not in known:
                    missing.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert not missing, f"the docs quote class or private names defined nowhere: {missing}"
    assert _class_like("the torch backend's `_Tiles`, `MiTACache`") == ["_Tiles", "MiTACache"]
    assert "_Tiles" not in known


# Words about how the project was worked on, which mean nothing to a user of the library.
PROCESS_WORDING = [
    r"\b(?:last|this|earlier|previous|next|a later) session\b",
    r"\bsession's\b",
    r"\bissue(?:'s| #?\d+)",
    r"\bthis round\b",
    r"\bhelpers?'? (?:measurements?|sessions?|runs?)\b",
    r"\bthe team\b",
    r"\blent\b",
    r"\bagents' (?:jobs|work)\b",
    r"\bgive_back\b",
    r"\bdevice tool\b",
    r"\bowed\b",
]


@pytest.mark.parametrize("path", _user_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_process_wording(path):
    text = path.read_text()
    found = [m.group(0) for pattern in PROCESS_WORDING for m in re.finditer(pattern, text, flags=re.I)]
    assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_process_wording_check_can_fail():
    text = "Measured in an earlier session; the issue's goal; helper measurements; run on a lent GPU."
    found = [m.group(0) for pattern in PROCESS_WORDING for m in re.finditer(pattern, text, flags=re.I)]
    assert len(found) == 4
    assert not any(
        re.search(p, "the `triton.jit` helpers when compiled", flags=re.I) for p in PROCESS_WORDING
    )
