"""Causal MiTA (SPEC §5): the torch path against the dense reference, exact causality, known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mita import MiTACache, mita_attention, mita_causal_attention
from mita.landmarks import block_mean
from mita.ops.causal import CausalRouting

HORIZONS = ["prefix", "frozen"]
BACKENDS = ["reference", "torch"]


def _inputs(b=1, h=2, hkv=None, n=20, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return rnd(b, h, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)


def _op(q, k, v, r=None, *, bs, topk, horizon, backend, **kw):
    r = block_mean(q, bs) if r is None else r
    return mita_causal_attention(
        q, k, v, r, topk=topk, block_size=bs, landmark_horizon=horizon, backend=backend, **kw
    )


# (B, H, Hkv, N, d, b, k, s, shared, routed): N not a multiple of b, N <= b, k above the visible keys,
# GQA, s = 2, each expert alone.
CASES = [
    (2, 2, 2, 21, 4, 4, 3, 1, True, True),
    (1, 4, 2, 19, 5, 4, 6, 1, True, True),  # GQA; k > keys visible to the first blocks
    (1, 2, 1, 24, 4, 4, 3, 2, True, True),  # s = 2 (and block 1 has a single landmark)
    (1, 2, 2, 17, 4, 4, 40, 1, True, True),  # k > N
    (1, 2, 2, 18, 4, 4, 3, 1, False, True),
    (1, 2, 2, 18, 4, 4, 3, 1, True, False),
    (1, 2, 2, 6, 4, 8, 3, 1, True, True),  # N < b: no landmark at all
    (1, 2, 2, 8, 4, 8, 3, 1, True, True),  # N == b: one landmark nobody may use
]


@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_matches_reference_forward_and_all_gradients(horizon, case):
    bsz, h, hkv, n, d, bs, topk, s, shared, routed = case
    q, k, v = _inputs(bsz, h, hkv, n, d, seed=n)
    r = (block_mean(q, bs) + 0.3 * torch.randn(bsz, h, n // bs, d, dtype=torch.float64)).detach()
    kw = dict(bs=bs, topk=topk, horizon=horizon, experts_per_query=s, shared=shared, routed=routed)
    grads = {}
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]
        out, routing = _op(*leaves, backend=backend, return_routing=True, **kw)
        out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
        grads[backend] = (out.detach(), routing, [t.grad for t in leaves])
    (o_ref, rt_ref, g_ref), (o_t, rt_t, g_t) = grads["reference"], grads["torch"]
    torch.testing.assert_close(o_t, o_ref, atol=1e-12, rtol=1e-10)
    for name, a, b in zip("qkv", g_t, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"grad of {name}")
    if n // bs > 0:
        torch.testing.assert_close(g_t[3], g_ref[3], atol=1e-11, rtol=1e-9, msg="grad of landmarks")
    assert torch.equal(rt_t.expert_index, rt_ref.expert_index)
    assert torch.equal(rt_t.key_index.sort(-1).values, rt_ref.key_index.sort(-1).values)


@pytest.mark.parametrize("horizon", HORIZONS)
def test_float32_torch_path_matches_float64_reference(horizon):
    q, k, v = _inputs(1, 2, 1, 70, 8, seed=3)
    ref = _op(q, k, v, bs=8, topk=5, horizon=horizon, backend="reference")
    out = _op(q.float(), k.float(), v.float(), bs=8, topk=5, horizon=horizon, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("horizon", HORIZONS)
def test_gradcheck(backend, horizon):
    q, k, v = _inputs(1, 1, 1, 9, 2, seed=5)
    r = block_mean(q, 3) + 0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]

    def f(q, k, v, r):
        return _op(q, k, v, r, bs=3, topk=2, horizon=horizon, backend=backend)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_routing_structure():
    q, k, v = _inputs(1, 2, 2, 22, 4, seed=7)
    for horizon, shape in (("prefix", (1, 2, 6, 5, 3)), ("frozen", (1, 2, 5, 3))):
        _, routing = _op(q, k, v, bs=4, topk=3, horizon=horizon, backend="torch", return_routing=True)
        assert isinstance(routing, CausalRouting) and routing.horizon == horizon and routing.block_size == 4
        e = routing.expert_index
        assert e.shape == (1, 2, 22, 1)
        assert (e[:, :, :4] == -1).all() and (e[:, :, 4:] >= 0).all()
        blocks = torch.arange(22) // 4
        assert (e[..., 0] < blocks).all() | (e[..., 0] == -1).all()  # an expert only from earlier blocks
        assert tuple(routing.key_index.shape) == shape
        ki = routing.key_index
        if horizon == "prefix":  # landmark j seen by block beta: keys before beta * b, and only j < beta
            for beta in range(6):
                for j in range(5):
                    got = ki[:, :, beta, j]
                    if j >= beta:
                        assert (got == -1).all()
                    else:
                        assert ((got >= 0) & (got < beta * 4)).all()
        else:  # landmark j: keys before (j + 1) * b, slots unfilled below k keys are -1
            for j in range(5):
                assert ((ki[:, :, j] >= 0) & (ki[:, :, j] < (j + 1) * 4)).all()


# ----------------------------------------------------------------------------- exact causality (§5.7)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("horizon", HORIZONS)
def test_perturbing_position_p_leaves_earlier_outputs_bitwise_unchanged(backend, horizon):
    n, bs = 27, 4
    q, k, v = _inputs(2, 4, 2, n, 4, seed=11)
    kw = dict(bs=bs, topk=3, horizon=horizon, backend=backend, experts_per_query=2)
    base = _op(q, k, v, **kw)
    for p in (0, 3, 4, 5, 11, 12, 20, 26):
        for which in range(3):
            x = [t.clone() for t in (q, k, v)]
            x[which][:, :, p:] += 10.0 * torch.randn_like(x[which][:, :, p:])  # from p on
            out = _op(*x, **kw)
            assert torch.equal(out[:, :, :p], base[:, :, :p]), (p, "qkv"[which])
            assert not torch.equal(out[:, :, p:], base[:, :, p:])


@pytest.mark.parametrize("horizon", HORIZONS)
def test_float32_torch_path_is_bitwise_causal_at_a_larger_size(horizon):
    # Many queries share expert tiles here (frozen) and many steps merge top-k sets (prefix): a query's
    # output must still not depend, to the bit, on what later queries route to or later keys hold.
    q, k, v = _inputs(1, 2, 1, 520, 16, seed=31, dtype=torch.float32)
    kw = dict(bs=32, topk=32, horizon=horizon, backend="torch")
    base = _op(q, k, v, **kw)
    for p in (40, 300, 511):
        x = [t.clone() for t in (q, k, v)]
        for t in x:
            t[:, :, p:] += torch.randn_like(t[:, :, p:])
        assert torch.equal(_op(*x, **kw)[:, :, :p], base[:, :, :p]), p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("horizon", HORIZONS)
def test_landmark_j_changes_nothing_before_block_j_plus_1(backend, horizon):
    q, k, v = _inputs(1, 2, 2, 24, 4, seed=12)
    r = block_mean(q, 4)
    base = _op(q, k, v, r, bs=4, topk=3, horizon=horizon, backend=backend)
    for j in range(6):
        r2 = r.clone()
        r2[:, :, j] += 5.0
        out = _op(q, k, v, r2, bs=4, topk=3, horizon=horizon, backend=backend)
        assert torch.equal(out[:, :, : (j + 1) * 4], base[:, :, : (j + 1) * 4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("horizon", HORIZONS)
def test_gradients_to_future_positions_are_exactly_zero(backend, horizon):
    n = 14
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, n, 3, seed=13))
    out = _op(q, k, v, bs=4, topk=2, horizon=horizon, backend=backend)
    for i in range(n):
        gq, gk, gv = torch.autograd.grad(out[:, :, i].sum(), (q, k, v), retain_graph=True)
        for name, g in (("q", gq), ("k", gk), ("v", gv)):
            assert (g[:, :, i + 1 :] == 0).all(), (i, name)
        assert gv[:, :, i].abs().sum() > 0 and (i == 0 or gq[:, :, i].abs().sum() > 0)


def _routed_by_hand(q, k, v, r, bs, topk, mask_first):
    """Routed-only causal MiTA (frozen horizon), one query at a time. ``mask_first=False`` is the leak of
    SPEC §5.2: top-k over ALL keys, then the keys outside the horizon dropped."""
    n, d = q.shape[-2], q.shape[-1]
    scores = r[0, 0] @ k[0, 0].T  # [n_l, N]
    if mask_first:
        horizon = torch.arange(n)[None, :] < (torch.arange(r.shape[2])[:, None] + 1) * bs
        scores = scores.masked_fill(~horizon, float("-inf"))
    top = scores.topk(topk, dim=-1)
    out = torch.zeros_like(q)
    for i in range(n):
        beta = i // bs
        keys = list(range(beta * bs, i + 1))
        if beta > 0:
            e = int((q[0, 0, i] @ r[0, 0, :beta].T).argmax())
            chosen = top.indices[e][top.values[e] > float("-inf")].tolist()
            keys += [t for t in chosen if t < (e + 1) * bs]
        logits = q[0, 0, i] @ k[0, 0, keys].T * d**-0.5
        out[0, 0, i] = torch.softmax(logits, -1) @ v[0, 0, keys]
    return out


def test_a_future_key_with_a_huge_score_leaks_into_top_k_before_mask_but_not_here():
    bs, topk, n = 4, 2, 16
    q, k, v = _inputs(1, 1, 1, n, 4, seed=17)
    r = block_mean(q, bs)
    k2 = k.clone()
    k2[0, 0, 13] = 50.0 * r[0, 0, 0] / r[0, 0, 0].norm()  # future for blocks 0..2, landmark 0's favourite
    leaky, leaky2 = (_routed_by_hand(q, kk, v, r, bs, topk, mask_first=False) for kk in (k, k2))
    assert not torch.equal(leaky[:, :, :13], leaky2[:, :, :13])  # the naive rule leaks the future key
    by_hand = _routed_by_hand(q, k, v, r, bs, topk, mask_first=True)
    for backend in BACKENDS:
        kw = dict(bs=bs, topk=topk, horizon="frozen", backend=backend, shared=False)
        ours, ours2 = _op(q, k, v, r, **kw), _op(q, k2, v, r, **kw)
        torch.testing.assert_close(ours, by_hand, atol=1e-12, rtol=0)
        assert torch.equal(ours[:, :, :13], ours2[:, :, :13])


# ----------------------------------------------------------------------------- known answers (§5.6)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("hkv", [1, 2])
def test_route_only_with_topk_at_least_n_is_causal_attention(backend, horizon, hkv):
    q, k, v = _inputs(2, 2, hkv, 23, 4, seed=19)
    out = _op(q, k, v, bs=4, topk=23, horizon=horizon, backend=backend, shared=False)
    if horizon == "prefix":  # every key before the block is in the set: exactly causal attention
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    else:  # frozen: the expert's set ends at its own block, so only check the first two blocks
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[:, :, :8], expected[:, :, :8], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("n", [1, 5, 8])
def test_sequences_no_longer_than_a_block_are_causal_attention(backend, horizon, n):
    q, k, v = _inputs(1, 4, 2, n, 4, seed=n)
    out = _op(q, k, v, bs=8, topk=3, horizon=horizon, backend=backend, experts_per_query=2)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


def test_half_precision_runs_in_float32_statistics():
    q, k, v = _inputs(1, 2, 2, 40, 8, seed=23)
    ref = _op(q, k, v, bs=8, topk=4, horizon="prefix", backend="reference")
    out = _op(q.bfloat16(), k.bfloat16(), v.bfloat16(), bs=8, topk=4, horizon="prefix", backend="torch")
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 0.1


# ----------------------------------------------------------------------------- bad input
def _bad(match, **kw):
    q, k, v = _inputs(1, 2, 2, 16, 4)
    args = dict(q=q, k=k, v=v, landmarks=block_mean(q, 4), topk=3, block_size=4, landmark_horizon="prefix")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        mita_causal_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("landmarks"), **args)


def test_bad_inputs_name_the_argument():
    q, k, v = _inputs(1, 2, 2, 16, 4)
    _bad("block_size", block_size=0)
    _bad("block_size", block_size=2.5)
    _bad("landmarks must have N // block_size", landmarks=block_mean(q, 8))
    _bad("landmark_horizon", landmark_horizon="future")
    _bad("key_padding_mask", key_padding_mask=torch.zeros(1, 16, dtype=torch.bool))
    _bad("same length", k=k[:, :, :8], v=v[:, :, :8])
    _bad("topk", topk=0)
    _bad("experts_per_query", experts_per_query=0)
    _bad("dedup", dedup=True, experts_per_query=2)
    _bad("shared=False and routed=False", shared=False, routed=False)
    _bad("backend='triton' has no causal path", backend="triton")
    _bad("backend='cpu' of the causal op supports landmark_horizon='frozen' only", backend="cpu")
    _bad("landmark_scale", landmark_scale=-1.0)
    _bad("scale", scale=float("inf"))  # the checks the non-causal op makes hold here too
    _bad("scale", scale=True)
    _bad("shared must be True or False", shared="no")
    _bad("dtype", v=v.float())
    _bad("multiple of k/v heads", k=k[:, :1].expand(1, 1, 16, 4).repeat(1, 3, 1, 1)[:, :3],
         v=v[:, :1].repeat(1, 3, 1, 1))  # fmt: skip


def test_the_non_causal_op_takes_no_causal_option():
    q, k, v = _inputs(1, 2, 2, 16, 4)
    options = ({"causal": True}, {"block_size": 4}, {"landmark_horizon": "frozen"}, {"grouped": True})
    for kw in options:
        with pytest.raises(TypeError, match=next(iter(kw))):
            mita_attention(q, k, v, block_mean(q, 4), topk=3, **kw)


def test_numpy_integer_options_are_accepted():
    q, k, v = _inputs(1, 2, 2, 16, 4)
    r = block_mean(q, 4)
    kw = dict(landmark_horizon="prefix")
    out = mita_causal_attention(q, k, v, r, topk=np.int64(4), block_size=np.int32(4), **kw)
    ref = mita_causal_attention(q, k, v, r, topk=4, block_size=4, **kw)
    assert torch.equal(out, ref)
    assert MiTACache(topk=np.int64(4), block_size=np.int64(4)).topk == 4


def test_block_mean():
    x = torch.arange(2 * 10 * 3, dtype=torch.float64).reshape(2, 10, 3)
    r = block_mean(x, 4)
    assert r.shape == (2, 2, 3)  # the trailing partial block gets no landmark
    torch.testing.assert_close(r[:, 1], x[:, 4:8].mean(1))
    assert block_mean(x, 11).shape == (2, 0, 3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="block_size"):
            block_mean(x, bad)
