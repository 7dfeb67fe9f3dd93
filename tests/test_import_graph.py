"""The package's import graph, read from the source (no imports run): no cycles between modules or between
subpackages, and nothing inside the package imports its root ``mita``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in (src / "mita").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(mods: dict[str, Path], name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The mita modules one import statement of module ``name`` reads (``from pkg import mod`` -> pkg.mod)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            own = name.split(".") if mods[name].name == "__init__.py" else name.split(".")[:-1]
            own = own[: len(own) - node.level + 1]
            base = ".".join(own + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for t in names:
        while t not in mods and "." in t:
            t = t.rsplit(".", 1)[0]
        if t in mods and t != name:
            out.append(t)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the mita modules it imports (anywhere in the file)."""
    mods = _modules(src)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(_targets(mods, name, node))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_imports_another_in_a_cycle():
    assert cycles(import_graph()) == []


def test_no_subpackages_import_each_other_in_a_cycle():
    graph: dict[str, set[str]] = {}
    for a, targets in import_graph().items():
        for b in targets:
            if _subpackage(a) != _subpackage(b):
                graph.setdefault(_subpackage(a), set()).add(_subpackage(b))
    assert cycles(graph) == []


def test_nothing_inside_imports_the_package_root():
    assert sorted(m for m, targets in import_graph().items() if "mita" in targets and m != "mita") == []


@pytest.mark.parametrize(
    "graph, expected",
    [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]), ({"a": {"b"}, "b": {"c"}, "c": set()}, [])],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected
