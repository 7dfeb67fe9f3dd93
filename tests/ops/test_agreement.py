"""The fast backends (torch, and the fused cpu kernel) against the dense reference: forward and every
gradient, over a grid of shapes."""

from __future__ import annotations

import pytest
import torch

from mita import mita_attention
from mita.landmarks import pool_1d
from mita.ops.api import validate
from mita.ops.torch_backend import torch_forward

from .helpers import CPU, make_inputs, padding_mask, same_routing

FAST = ["torch", CPU]

# (B, H, Hkv, N, d, m, k, s, dedup, pad): N is deliberately not a multiple of m or of any tile size.
CASES = {
    "basic": (2, 2, 2, 37, 8, 5, 7, 1, False, None),
    "m1": (2, 2, 2, 29, 8, 1, 6, 1, False, None),
    "k_eq_n": (1, 2, 2, 23, 8, 3, 23, 1, False, None),
    "s2": (2, 2, 2, 41, 8, 6, 5, 2, False, None),
    "s2_dedup": (2, 2, 2, 41, 8, 6, 9, 2, True, None),
    "s3": (1, 3, 3, 33, 8, 5, 8, 3, False, None),
    "s3_dedup": (1, 3, 3, 33, 8, 5, 8, 3, True, None),
    "mqa": (2, 4, 1, 30, 8, 4, 6, 1, False, None),
    "gqa_half": (2, 4, 2, 30, 8, 4, 6, 2, True, None),
    "padding": (3, 2, 2, 26, 8, 4, 5, 1, False, [0, 4, 11]),
    "padding_fewer_valid_than_k": (2, 2, 1, 20, 8, 3, 9, 2, True, [2, 15]),
    "many_tiles": (1, 1, 1, 300, 16, 3, 12, 1, False, None),
    "long_value_dim": (2, 2, 2, 19, 4, 2, 4, 1, False, None),
}


def _run(backend, q, k, v, r, **kw):
    return mita_attention(q, k, v, r, backend=backend, return_routing=True, **kw)


def _grads(loss, inputs):
    """Gradients of loss, with zeros for inputs it does not depend on."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _compare(case, dtype, atol, rtol, shared=True, routed=True, backend="torch"):
    b, h, hkv, n, d, m, k, s, dedup, pad = CASES[case]
    q, kk, v, r = make_inputs(b, h, hkv, n, d, m, dtype=dtype, seed=hash(case) % 1000)
    mask = padding_mask(b, n, pad) if pad else None
    kw = dict(topk=k, experts_per_query=s, dedup=dedup, key_padding_mask=mask, shared=shared, routed=routed)
    out_ref, rt_ref = _run("reference", q, kk, v, r, **kw)
    out_t, rt_t = _run(backend, q, kk, v, r, **kw)
    assert same_routing(rt_ref, rt_t, backend, mask)
    torch.testing.assert_close(out_t, out_ref, atol=atol, rtol=rtol)
    weight = torch.randn_like(out_ref)  # a generic upstream gradient
    g_ref = _grads((out_ref * weight).sum(), [q, kk, v, r])
    g_t = _grads((out_t * weight).sum(), [q, kk, v, r])
    if not shared:  # route-only: landmarks act only through discrete choices, which carry no gradient
        assert not g_ref[3].any() and not g_t[3].any()
    for name, a, e in zip("q k v landmarks".split(), g_t, g_ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_matches_reference_float64(case, backend):
    _compare(case, torch.float64, atol=1e-10, rtol=1e-9, backend=backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", ["basic", "s2_dedup", "gqa_half", "padding", "many_tiles"])
def test_torch_matches_reference_float32(case, backend):
    _compare(case, torch.float32, atol=2e-5, rtol=2e-5, backend=backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", ["basic", "s2", "padding", "mqa"])
@pytest.mark.parametrize("which", ["shared_only", "routed_only"])
def test_ablations_match_reference(case, which, backend):
    _compare(
        case,
        torch.float64,
        atol=1e-10,
        rtol=1e-9,
        shared=which == "shared_only",
        routed=which != "shared_only",
        backend=backend,
    )


@pytest.mark.parametrize("backend", FAST)
def test_unchosen_landmark_and_key_chosen_by_all(backend):
    """A landmark no query routes to, and a key every landmark selects, both handled identically."""
    b, h, n, d, m, k = 2, 2, 40, 8, 5, 6
    q, kk, v, r = make_inputs(b, h, h, n, d, m, requires_grad=False)
    q[..., 0] += 4.0  # every query points along e0 ...
    r[..., 2:] *= 0.1
    r[..., 0] = torch.linspace(
        1, 2, m
    )  # ... so landmarks with e0 > 0 win and landmark 0 (e0 = -5) never does
    r[..., 0, 0] = -5.0
    r[..., 1] = 1.0  # every landmark, landmark 0 included, looks along e1 equally (routing unchanged) ...
    kk[:, :, 7] = 0
    kk[:, :, 7, 1] = 100.0  # ... where key 7 is far longer than any other key: every landmark selects it
    for t in (q, kk, v, r):
        t.requires_grad_(True)
    out_ref, rt = _run("reference", q, kk, v, r, topk=k)
    assert not (rt.expert_index == 0).any(), "landmark 0 should receive no query"
    assert (rt.key_index == 7).any(-1).all(), "key 7 should be selected by every landmark"
    out_t, rt_t = _run(backend, q, kk, v, r, topk=k)
    assert same_routing(rt, rt_t, backend)
    torch.testing.assert_close(out_t, out_ref, atol=1e-10, rtol=1e-9)
    g_ref = torch.autograd.grad(out_ref.square().sum(), [q, kk, v, r])
    g_t = torch.autograd.grad(out_t.square().sum(), [q, kk, v, r])
    for a, e in zip(g_t, g_ref):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("fast", FAST)
def test_pooled_landmarks_gradient_reaches_queries_through_both_paths(fast):
    q, kk, v, _ = make_inputs(2, 2, 2, 30, 8, 4)
    grads = []
    for backend in ("reference", fast):
        out = mita_attention(q, kk, v, pool_1d(q, 4), topk=5, backend=backend)
        grads.append(torch.autograd.grad(out.sin().sum(), q)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("tile", [8, 16, 64])
def test_tile_size_does_not_change_result(tile):
    q, kk, v, r = make_inputs(2, 2, 2, 77, 8, 5, requires_grad=False)
    kw = dict(
        topk=9, experts_per_query=2, scale=None, landmark_scale=None, shared=True, routed=True, dedup=True
    )
    p = validate(q, kk, v, r, key_padding_mask=None, backend="torch", **kw)
    ref = mita_attention(
        q, kk, v, r, backend="reference", **{x: kw[x] for x in ("topk", "experts_per_query", "dedup")}
    )
    out, _ = torch_forward(p, q, kk, v, r, None, tile=tile)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
