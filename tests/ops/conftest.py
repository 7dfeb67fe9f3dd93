"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest

from mita.ops.cpu import build


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget the CPU kernels' cached availability before and after (the next call re-detects, loading
    the cache); yields ``monkeypatch``, undone before the state is forgotten again."""
    build.reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    build.reset_for_tests()
