"""Fixtures for the analysis tests."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Generated data goes to a session cache: checkpoints never choose where caches are written."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("mita-cache")
        mp.setenv("MITA_CACHE", str(path))
        yield path
