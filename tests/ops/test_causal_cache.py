"""``MiTACache`` (SPEC §5.8): decoding equals the parallel op; chunked prefill equals token by token."""

from __future__ import annotations

import pytest
import torch

from mita import MiTACache, mita_causal_attention
from mita.landmarks import block_mean

HORIZONS = ["prefix", "frozen"]


def _inputs(b, h, hkv, n, d, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    return (
        torch.randn(b, h, n, d, generator=g, dtype=torch.float64),
        torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64),
        torch.randn(b, hkv, n, dv, generator=g, dtype=torch.float64),
    )


def _decode(cache, q, k, v, chunks):
    outs, pos = [], 0
    for c in chunks:
        outs.append(cache.append(q[:, :, pos : pos + c], k[:, :, pos : pos + c], v[:, :, pos : pos + c]))
        assert outs[-1].shape[2] == c and len(cache) == pos + c
        pos += c
    assert pos == q.shape[2]
    return torch.cat(outs, dim=2)


# (B, H, Hkv, N, d, dv, b, k, s, shared, routed)
CASES = [
    (2, 2, 2, 37, 4, 4, 4, 3, 1, True, True),  # N not a multiple of b
    (1, 4, 2, 30, 4, 3, 4, 6, 1, True, True),  # GQA, dv != d, k above the visible keys early on
    (1, 2, 1, 33, 4, 4, 4, 3, 2, True, True),  # s = 2
    (1, 2, 2, 26, 4, 4, 4, 3, 1, False, True),
    (1, 2, 2, 26, 4, 4, 4, 3, 1, True, False),
    (1, 2, 2, 5, 4, 4, 8, 3, 1, True, True),  # shorter than a block
]


@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_token_by_token_decoding_equals_the_parallel_op(horizon, case):
    bsz, h, hkv, n, d, dv, bs, topk, s, shared, routed = case
    q, k, v = _inputs(bsz, h, hkv, n, d, seed=n, dv=dv)
    opts = dict(experts_per_query=s, shared=shared, routed=routed)
    ref = mita_causal_attention(
        q, k, v, block_mean(q, bs), topk=topk, block_size=bs, landmark_horizon=horizon,
        backend="reference", **opts,
    )  # fmt: skip
    cache = MiTACache(topk=topk, block_size=bs, landmark_horizon=horizon, **opts)
    out = _decode(cache, q, k, v, [1] * n)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert cache.num_landmarks == n // bs
    torch.testing.assert_close(cache.landmarks, block_mean(q, bs), atol=1e-14, rtol=0)


@pytest.mark.parametrize("horizon", HORIZONS)
def test_chunked_prefill_equals_token_by_token(horizon):
    q, k, v = _inputs(1, 4, 2, 41, 4, seed=3)
    one = _decode(
        MiTACache(topk=3, block_size=4, landmark_horizon=horizon, experts_per_query=2), q, k, v, [1] * 41
    )
    for chunks in ([41], [4] * 10 + [1], [5] * 8 + [1], [3, 1, 8, 2, 7, 13, 7], [9, 32]):
        cache = MiTACache(topk=3, block_size=4, landmark_horizon=horizon, experts_per_query=2)
        torch.testing.assert_close(_decode(cache, q, k, v, chunks), one, atol=1e-12, rtol=1e-10)


def test_prefill_then_decode_continues_the_sequence():
    q, k, v = _inputs(1, 2, 2, 50, 4, seed=4)
    ref = mita_causal_attention(
        q, k, v, block_mean(q, 8), topk=4, block_size=8, landmark_horizon="prefix", backend="torch"
    )
    cache = MiTACache(topk=4, block_size=8)
    out = _decode(cache, q, k, v, [29] + [1] * 21)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    cache.reset()
    assert len(cache) == 0 and cache.landmarks is None
    torch.testing.assert_close(_decode(cache, q, k, v, [50]), ref, atol=1e-12, rtol=1e-10)


def test_float32_cache_matches_the_parallel_op():
    q, k, v = (t.float() for t in _inputs(1, 2, 2, 70, 8, seed=5))
    ref = mita_causal_attention(
        q, k, v, block_mean(q, 8), topk=5, block_size=8, landmark_horizon="prefix", backend="torch"
    )
    out = _decode(MiTACache(topk=5, block_size=8), q, k, v, [1] * 70)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_storage_grows_geometrically_and_memory_is_reported():
    bs, d, n = 8, 4, 120
    q, k, v = _inputs(1, 2, 2, n, d, seed=6)
    cache = MiTACache(topk=8, block_size=bs)
    storages = set()
    for i in range(n):
        cache.append(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1])
        storages.add(cache._k.data_ptr())
    assert len(storages) <= 5  # doublings from 16 to >= 120, not one copy per token
    mem = cache.memory()
    assert mem["kv_bytes"] == 2 * 1 * 2 * n * d * 8
    nl = n // bs
    # per query head and landmark: r, A, numerator (d each), max, sum, top-k scores (f64), indices (i32)
    per_landmark = (3 * d + 2 + 8) * 8 + 8 * 4
    assert mem["extra_bytes"] == 1 * 2 * (nl * per_landmark + bs * d * 8)
    assert mem["extra_fraction"] == pytest.approx(mem["extra_bytes"] / mem["kv_bytes"])
    assert mem["allocated_bytes"] >= mem["kv_bytes"] + mem["extra_bytes"]
    frozen = MiTACache(topk=8, block_size=bs, landmark_horizon="frozen")
    frozen.append(q, k, v)
    assert frozen.memory()["extra_bytes"] < mem["extra_bytes"]  # no online-softmax state, no scores


def test_bad_inputs_raise_value_errors_naming_them():
    q, k, v = _inputs(1, 2, 2, 4, 4)
    for kw, match in (
        (dict(topk=0), "topk"),
        (dict(topk=2, block_size=0), "block_size"),
        (dict(topk=2, landmark_horizon="past"), "landmark_horizon"),
        (dict(topk=2, experts_per_query=0), "experts_per_query"),
        (dict(topk=2, shared=False, routed=False), "shared=False and routed=False"),
        (dict(topk=2, scale=0.0), "scale"),
        (dict(topk=2, scale=float("inf")), "scale"),
        (dict(topk=2, routed="no"), "routed must be True or False"),
    ):
        with pytest.raises(ValueError, match=match):
            MiTACache(**kw)
    cache = MiTACache(topk=2, block_size=2)
    with pytest.raises(ValueError, match="at least one new token"):
        cache.append(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="k .* and v"):
        cache.append(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        cache.append(q[:, :1].expand(1, 3, 4, 4), k, v)
    with pytest.raises(ValueError, match="q must be"):
        cache.append(q[0], k, v)
    cache.append(q, k, v)
    with pytest.raises(ValueError, match="the cache holds"):
        cache.append(q[:, :, :1].float(), k[:, :, :1].float(), v[:, :, :1].float())
