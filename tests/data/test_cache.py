"""The on-disk cache: round trip, parameter keying, atomic writes, corrupt files."""

from __future__ import annotations

import numpy as np
import pytest

from mita.data import build_dataset
from mita.data.cache import cache_path, cache_root, cached_arrays, check_rows


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MITA_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MITA_CACHE")
    assert cache_root().name == "mita" and cache_root().parent.name == ".cache"


def test_round_trip_builds_once_and_keys_on_params(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5, dtype=np.int64), "b": np.ones((2, 3), dtype=np.uint8)}

    first = cached_arrays("t", "train", {"n": 5}, build, tmp_path)
    second = cached_arrays("t", "train", {"n": 5}, build, tmp_path)
    assert len(calls) == 1
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
        assert first[k].dtype == second[k].dtype
    cached_arrays("t", "train", {"n": 6}, build, tmp_path)
    cached_arrays("t", "test", {"n": 5}, build, tmp_path)
    assert len(calls) == 3
    assert cache_path("t", "train", {"n": 5}, tmp_path) != cache_path("t", "train", {"n": 6}, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))  # temp files were renamed, none left behind


def test_corrupt_cache_is_rebuilt(tmp_path):
    path = cache_path("t", "train", {"n": 1}, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="rebuilding data cache .* cannot be read"):
        out = cached_arrays("t", "train", {"n": 1}, lambda: {"a": np.array([7])}, tmp_path)
    assert out["a"].tolist() == [7]
    assert cached_arrays("t", "train", {"n": 1}, lambda: {"a": np.array([0])}, tmp_path)["a"].tolist() == [7]


def test_dataset_cache_round_trip(tmp_path):
    ds1 = build_dataset("listops", "val", cache_dir=tmp_path, size=12, seq_len=64)
    files = list(tmp_path.glob("listops-val-*.npz"))
    assert len(files) == 1
    ds2 = build_dataset("listops", "val", cache_dir=tmp_path, size=12, seq_len=64)  # loaded from the file
    for i in range(12):
        assert ds1[i][1] == ds2[i][1]
        assert ds1[i][0].equal(ds2[i][0])


def test_cache_with_a_missing_key_or_short_arrays_is_rebuilt(tmp_path):
    first = build_dataset("listops", "val", cache_dir=tmp_path, size=12, seq_len=64)
    (path,) = tmp_path.glob("listops-val-*.npz")
    with np.load(path) as f:
        good = {k: f[k] for k in f.files}
    for broken in ({k: v for k, v in good.items() if k != "labels"}, {**good, "labels": good["labels"][:5]}):
        np.savez(path.with_suffix(".tmp.npz"), **broken)
        path.with_suffix(".tmp.npz").replace(path)
        with pytest.warns(UserWarning, match="rebuilding data cache"):
            again = build_dataset("listops", "val", cache_dir=tmp_path, size=12, seq_len=64)
        assert len(again) == 12 and all(again[i][0].equal(first[i][0]) for i in range(12))
        with np.load(path) as f:  # the file was rewritten whole
            assert set(f.files) == set(good) and len(f["labels"]) == 12
    arrays = {"a": np.zeros(3), "b": np.zeros(2)}
    assert check_rows(arrays, ("a", "c"), ()) == "it has no c"
    assert "lengths {'a': 3, 'b': 2}" in check_rows(arrays, ("a", "b"), ("a", "b"))
    assert "expected 4 each" in check_rows(arrays, ("a",), ("a",), 4)
    assert check_rows(arrays, ("a", "b"), ("a",), 3) is None
