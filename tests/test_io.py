"""The atomic-write and strict-JSON helper."""

from __future__ import annotations

import json
import math
import os

import pytest

from mita.io import atomic_path, to_json, write_json, write_text


def test_write_json_is_strict_and_atomic(tmp_path):
    path = write_json(tmp_path / "a" / "r.json", {"x": math.nan, "y": [1.0, math.inf], "z": "ok"})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}")) == {
        "x": None,
        "y": [1.0, None],
        "z": "ok",
    }
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind


def test_failed_write_leaves_the_old_file(tmp_path):
    path = write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_to_json_rejects_unencodable_objects():
    with pytest.raises(TypeError):
        to_json({"a": object()})
    assert to_json({"a": object()}, default=lambda o: "obj", indent=None) == '{"a": "obj"}'
