"""Non-finite inputs: no crash, no out-of-bounds routing, NaN exactly where a row reads a NaN/Inf, and
nothing leaks across positions (causal), batch rows or heads, forward or backward."""

from __future__ import annotations

import pytest
import torch

from mita import MiTACache, mita_attention, mita_causal_attention
from mita.landmarks import block_mean, pool_1d
from mita.ops.cpu.build import availability

from .helpers import CPU

BAD = (float("nan"), float("inf"), -float("inf"))
NONCAUSAL = ("reference", "torch", CPU)
CAUSAL = [("reference", "prefix"), ("reference", "frozen"), ("torch", "prefix"), ("torch", "frozen"),
          pytest.param(("cpu", "frozen"), marks=CPU.marks)]  # fmt: skip


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- the argmax crash
@pytest.mark.parametrize("backend", NONCAUSAL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_query_is_routed_to_its_first_nan_landmark_as_torch_argmax(backend, dtype):
    # One NaN in q made the fused kernel's argmax search walk off the end of its row (segfault, heap
    # corruption, or expert_index = 21 with m = 3). A query whose q . r is -inf everywhere goes to 0.
    q, k, v = (_rand(1, 2, 40, 33, seed=s, dtype=dtype) for s in range(3))
    r = _rand(1, 2, 3, 33, seed=3, dtype=dtype)
    q[0, 0, 5, 0] = float("nan")
    q[0, 1, 7] = 0.0
    r[0, 1, :, :] = 1.0
    q[0, 1, 7, 0] = -float("inf")  # q . r_j = -inf for every j
    for _ in range(3):  # the crash was intermittent: repeat
        out, routing = mita_attention(q, k, v, r, topk=8, backend=backend, return_routing=True)
        e = routing.expert_index
        assert ((e >= 0) & (e < 3)).all()
        want = (q @ r.transpose(-1, -2)).argmax(-1, keepdim=True)
        assert torch.equal(e, want)
        assert out[0, 0, 5].isnan().all() and torch.isfinite(out[0, 0, :5]).all()
        assert torch.isfinite(out[0, 0, 6:]).all() and torch.isfinite(out[1:]).all()


def test_a_nan_query_with_pooled_landmarks_does_not_crash():
    # The trainer's divergence path: NaN reaches q, and pooled landmarks spread it to every row.
    q, k, v = (_rand(1, 2, 64, 32, seed=s, dtype=torch.float32) for s in range(3))
    q[0, 0, 5, 0] = float("nan")
    out = mita_attention(q, k, v, pool_1d(q, 16), topk=16)
    assert out[0, 0].isnan().all() and torch.isfinite(out[0, 1]).all()


# ----------------------------------------------------------------------------- non-causal patterns
@pytest.mark.parametrize("backend", NONCAUSAL)
@pytest.mark.parametrize("where", ["q", "k", "v", "landmarks", "padded k", "padded v"])
def test_non_finite_outputs_match_the_reference_and_stay_in_their_batch_row_and_kv_group(backend, where):
    b, h, hkv, n, d = 2, 4, 2, 48, 8
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, 40:] = True
    for val in BAD:
        q, k, v = _rand(b, h, n, d, seed=1), _rand(b, hkv, n, d, seed=2), _rand(b, hkv, n, d, seed=3)
        r = _rand(b, h, 6, d, seed=4)
        x = {"q": q, "k": k, "v": v, "landmarks": r, "padded k": k, "padded v": v}[where]
        pos = 44 if where.startswith("padded") else 9  # keys 40.. are padding
        x[0, 0, pos if where != "landmarks" else 2, 3] = val
        kw = dict(topk=6, key_padding_mask=mask)
        out = mita_attention(q, k, v, r, backend=backend, **kw)
        ref = mita_attention(q, k, v, r, backend="reference", **kw)
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), (where, val)
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-9, atol=1e-12)
        assert torch.isfinite(out[1]).all()  # the other batch row
        others = 1 if where in ("q", "landmarks") else 2  # query head 0 / kv head 0 = query heads 0, 1
        assert torch.isfinite(out[0, others:]).all()
        if where.startswith("padded"):  # padding is excluded by selection: no output reads it
            assert torch.isfinite(out).all()
            grads = torch.autograd.grad(
                mita_attention(*(t.requires_grad_() for t in (q, k, v, r)), backend=backend, **kw).sum(),
                (q, k, v, r),
            )
            assert all(torch.isfinite(g).all() for g in grads), where


# ----------------------------------------------------------------------------- causal: nothing leaks back
def _causal(q, k, v, r, backend, horizon, shared=True, s=1):
    return mita_causal_attention(q, k, v, r, topk=6, block_size=8, landmark_horizon=horizon,
                          backend=backend, shared=shared, experts_per_query=s)  # fmt: skip


@pytest.mark.parametrize("case", CAUSAL)
@pytest.mark.parametrize("shared", [True, False])
def test_a_non_finite_token_leaves_every_earlier_output_and_gradient_bitwise_unchanged(case, shared):
    backend, horizon = case
    b, h, hkv, n, d, p = 2, 4, 2, 61, 8, 29
    clean = [_rand(b, h, n, d, seed=5), _rand(b, hkv, n, d, seed=6), _rand(b, hkv, n, d, seed=7)]
    r0 = block_mean(clean[0], 8)

    def run(x, r):
        x = [t.clone().requires_grad_() for t in x]
        rr = r.clone().requires_grad_()
        out = _causal(*x, rr, backend, horizon, shared)
        grads = torch.autograd.grad(out[:, :, :p].sum(), [*x, rr], allow_unused=True)
        return out.detach(), grads

    base, gbase = run(clean, r0)
    assert torch.isfinite(base).all()
    for which in range(3):
        for val in BAD:
            x = [t.clone() for t in clean]
            x[which][0, 1 if which == 0 else 0, p, 2] = val
            out, grads = run(x, r0)
            assert torch.equal(out[:, :, :p], base[:, :, :p]), ("qkv"[which], val)
            assert out[0, 1 if which == 0 else 0, p].isnan().all()
            for g, g0 in zip(grads, gbase):  # zero future Jacobian, for any input
                assert (g is None and g0 is None) or torch.equal(g, g0), ("qkv"[which], val)
            assert torch.equal(out[1], base[1])  # batch independence
            heads = slice(2, 4) if which else [0, 2, 3]  # kv head 1 / the other query heads
            assert torch.equal(out[0, heads], base[0, heads])
    for j in (1, 4):  # a non-finite landmark: nothing before block j + 1 changes
        for val in BAD:
            r = r0.clone()
            r[0, 0, j, 1] = val
            out, _ = run(clean, r)
            assert torch.equal(out[:, :, : (j + 1) * 8], base[:, :, : (j + 1) * 8])
            assert out[0, 0, (j + 1) * 8 :].isnan().all()


@pytest.mark.parametrize("horizon", ["prefix", "frozen"])
@pytest.mark.parametrize("shared", [True, False])
def test_every_causal_backend_puts_nan_in_the_same_rows(horizon, shared):
    n = 70
    q, k, v = _rand(1, 2, n, 8, seed=8), _rand(1, 1, n, 8, seed=9), _rand(1, 1, n, 8, seed=10)
    for which, pos in ((0, 33), (1, 12), (1, 50), (2, 20), (2, 66)):
        x = [t.clone() for t in (q, k, v)]
        x[which][0, 0, pos, 0] = float("nan")
        r = block_mean(x[0], 8)
        outs = {be: _causal(*x, r, be, horizon, shared, s=2) for be in ("reference", "torch")}
        if horizon == "frozen" and not CPU.marks[0].args[0]:
            outs["cpu"] = _causal(*x, r, "cpu", horizon, shared, s=2)
        rows = {be: o.isnan().any(-1) for be, o in outs.items()}
        for be, got in rows.items():
            assert torch.equal(got, rows["reference"]), (be, which, pos)
            nan = outs[be].isnan()
            assert torch.equal(nan, got[..., None].expand_as(nan))  # whole rows, nothing partial
        assert not rows["reference"][..., :pos].any()


@pytest.mark.parametrize("horizon", ["prefix", "frozen"])
@pytest.mark.parametrize("shared", [True, False])
def test_decoding_cache_puts_nan_where_the_parallel_op_does(horizon, shared):
    n, bs = 90, 16
    for which, val in ((0, float("nan")), (1, float("inf")), (2, -float("inf"))):
        q, k, v = _rand(1, 4, n, 8, seed=11), _rand(1, 2, n, 8, seed=12), _rand(1, 2, n, 8, seed=13)
        (q, k, v)[which][0, 0, 37, 1] = val
        par = mita_causal_attention(q, k, v, block_mean(q, bs), topk=10, block_size=bs,
                                    landmark_horizon=horizon, shared=shared, backend="torch")  # fmt: skip
        cache = MiTACache(10, bs, horizon, shared=shared)
        pos, outs = 0, []
        for step in (1, 7, 30, 1, 51):  # chunked prefill and single tokens
            outs.append(cache.append(q[:, :, pos : pos + step], k[:, :, pos : pos + step],
                                     v[:, :, pos : pos + step]))  # fmt: skip
            pos += step
        dec = torch.cat(outs, 2)
        assert torch.equal(dec.isnan(), par.isnan()), (which, val)
        assert not dec[:, :, :37].isnan().any()
        torch.testing.assert_close(dec.nan_to_num(), par.nan_to_num(), atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- second order
@pytest.mark.parametrize("causal", [False, True])
def test_double_backward_through_the_cpu_backend_raises_instead_of_returning_zero(causal):
    if CPU.marks[0].args[0]:
        pytest.skip("no C++ compiler or ninja")
    q, k, v = (_rand(1, 2, 32, 8, seed=s).requires_grad_() for s in range(3))
    if causal:
        kw = dict(block_size=8, landmark_horizon="frozen", backend="cpu")
        out = mita_causal_attention(q, k, v, block_mean(q, 8), topk=4, **kw)
    else:
        out = mita_attention(q, k, v, pool_1d(q, 4), topk=4, backend="cpu")
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)


def test_large_landmark_scale_gives_the_reference_on_cpu():
    if CPU.marks[0].args[0]:
        pytest.skip("no C++ compiler or ninja")
    q, k, v = (_rand(1, 2, 64, 16, seed=s, dtype=torch.float32) for s in range(3))
    r = pool_1d(q, 8)
    for scale in (1e9, 1e30):
        ref = mita_attention(q, k, v, r, topk=8, landmark_scale=scale, backend="reference")
        out = mita_attention(q, k, v, r, topk=8, landmark_scale=scale, backend="cpu")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- indices from outside
def test_the_raw_kernels_refuse_indices_and_shapes_that_would_address_outside_their_tensors():
    if CPU.marks[0].args[0]:
        pytest.skip("no C++ compiler or ninja")
    assert availability()[0] and availability("mita_cpu_causal")[0]
    b, h, n, d, m, kk = 1, 2, 16, 4, 4, 3
    q, k, v = (_rand(b, h, n, d, seed=s) for s in range(3))
    qr, sv = _rand(b, h, n, m, seed=4), _rand(b, h, m, d, seed=5)
    kidx = torch.zeros(b, h, m, kk, dtype=torch.long)
    eidx = torch.zeros(b, h, n, 1, dtype=torch.long)
    fwd = torch.ops.mita_cpu.split_fwd
    fwd(q, k, v, qr, sv, kidx, eidx, None, None, 0.5, 0.25, True)  # valid: runs
    for bad_k, bad_e, bad_qr, what in (
        (kidx.clone().fill_(n), eidx, qr, "key_index"),
        (kidx.clone().fill_(-1), eidx, qr, "key_index"),
        (kidx, eidx.clone().fill_(m), qr, "expert_index"),
        (kidx, eidx.clone().fill_(-5), qr, "expert_index"),
        (kidx, eidx, qr[:, :, :, :2], "qr"),
        (kidx, eidx[:, :, :3], qr, "expert_index"),
    ):
        with pytest.raises(RuntimeError, match=what):
            fwd(q, k, v, bad_qr, sv, bad_k, bad_e, None, None, 0.5, 0.25, True)
    with pytest.raises(RuntimeError, match="pad"):
        fwd(q, k, v, qr, sv, kidx, eidx, torch.zeros(b, n - 1, dtype=torch.bool), None, 0.5, 0.25, True)
    # Causal: an expert from a later block (or past the landmarks) is refused, not read.
    bs, nl = 4, n // 4
    r, ck = _rand(b, h, nl, d, seed=6), torch.zeros(b, h, nl, kk, dtype=torch.long)
    ce = torch.full((b, h, n, 1), -1, dtype=torch.long)
    cfwd = torch.ops.mita_cpu_causal.fwd
    cfwd(q, k, v, r, None, ck, ce, 0.5, 0.25, bs, True)
    late = ce.clone()
    late[0, 0, 5, 0] = 1  # query 5 is in block 1: only landmark 0 is visible
    for bad_e, bad_k in ((late, ck), (ce, ck.clone().fill_(n))):
        with pytest.raises(RuntimeError, match="expert_index|key_index"):
            cfwd(q, k, v, r, None, bad_k, bad_e, 0.5, 0.25, bs, True)
