"""``python -m mita.bench.context_parallel``: the byte formula, and the measured bytes that equal it."""

import sys

import pytest

from mita.bench import context_parallel as cp


def test_formula_known_case():
    # N = 2^20, d = dv = 128, H = Hkv = 16, m = k = 64, P = 8, 2-byte payloads (docs/distributed.md)
    f = cp.formula(2**20, 8, b=1, h=16, hkv=16, d=128, dv=128, m=64, k=64, f=2)
    rows = 2 * 7 * 16 * 64 * 64 * 256 * 2 / 8
    assert f["mita_forward"] == 7 * 16 * 8 * 128 * 2 + 7 * 16 * 64 * 130 * 2 + 7 * 16 * 64 * 64 * 10 + rows
    assert f["allgather_kv_forward"] == f["allgather_kv_backward"] == 7 * 16 * 2**17 * 256 * 2  # 7 GiB
    assert round(f["mita_forward"] / 2**20, 1) == 62.4 and round(f["mita_backward"] / 2**20, 1) == 58.0


@pytest.mark.skipif(sys.platform != "linux", reason="forked gloo processes")
def test_measured_bytes_equal_the_formula(monkeypatch):
    monkeypatch.setattr(cp, "SHAPE", {"b": 1, "h": 2, "hkv": 1, "d": 8, "dv": 4, "m": 6, "k": 5})
    rows = cp.bytes_table([96, 192], [3])
    for r in rows:
        assert r["same_on_every_rank"]
        assert r["mita_forward"] == r["formula"]["mita_forward"]
        assert r["mita_backward"] == r["formula"]["mita_backward"]
    assert rows[0]["mita_forward"] == rows[1]["mita_forward"]
    assert rows[1]["formula"]["allgather_kv_forward"] == 2 * rows[0]["formula"]["allgather_kv_forward"]
