"""Fixtures for the training tests."""

import pytest

pytest.importorskip("safetensors")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One generated-data cache for the whole session."""
    return str(tmp_path_factory.mktemp("mita-cache"))
