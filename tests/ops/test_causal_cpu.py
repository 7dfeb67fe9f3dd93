"""The fused CPU kernels of causal MiTA (``backend="cpu"``, ``landmark_horizon="frozen"``) against the
dense reference: forward, routing and all four gradients, exact causality, thread independence, known
answers, dispatch and fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mita import mita_causal_attention
from mita.landmarks import block_mean
from mita.ops.causal import api as causal_op
from mita.ops.causal import cpu_backend as kernels
from mita.ops.cpu import build

needs_tools = pytest.mark.skipif(build._missing_tools() is not None, reason="no C++ compiler or ninja")


def _inputs(b=1, h=2, hkv=None, n=20, d=4, seed=0, dtype=torch.float64, dv=None):
    g = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return rnd(b, h, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d if dv is None else dv)


def _op(q, k, v, r=None, *, bs, topk, backend, **kw):
    r = block_mean(q, bs) if r is None else r
    return mita_causal_attention(
        q, k, v, r, topk=topk, block_size=bs, landmark_horizon="frozen", backend=backend, **kw
    )


def _run(backend, q, k, v, r, seed=1, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]
    out, routing = _op(*leaves, backend=backend, return_routing=True, **kw)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(up.to(out.dtype))  # the same upstream gradient in every dtype
    return out.detach(), routing, [t.grad for t in leaves]


# (B, H, Hkv, N, d, dv, b, k, s, shared, routed): N not a multiple of b, N <= b, k above the visible keys
# and above N, GQA, s = 2 and 3, dv != d, each expert alone, padded vector widths (d = 17, 40).
CASES = [
    (2, 2, 2, 21, 4, 4, 4, 3, 1, True, True),
    (1, 4, 2, 19, 5, 5, 4, 6, 1, True, True),  # GQA; k > keys visible to the first landmarks
    (1, 2, 1, 24, 4, 4, 4, 3, 2, True, True),  # s = 2 (block 1 has a single landmark)
    (1, 2, 2, 17, 4, 4, 4, 40, 1, True, True),  # k > N
    (1, 2, 2, 18, 4, 4, 4, 3, 1, False, True),
    (1, 2, 2, 18, 4, 4, 4, 3, 1, True, False),
    (1, 2, 2, 6, 4, 4, 8, 3, 1, True, True),  # N < b: no landmark at all
    (1, 2, 2, 8, 4, 4, 8, 3, 1, True, True),  # N == b: one landmark nobody may use
    (1, 2, 1, 130, 17, 9, 7, 9, 3, True, True),  # GQA, s = 3, dv != d, odd sizes
    (1, 1, 1, 200, 40, 40, 16, 20, 1, True, True),  # several vector widths per row
]


@needs_tools
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_matches_reference_forward_routing_and_all_gradients(case):
    bsz, h, hkv, n, d, dv, bs, topk, s, shared, routed = case
    q, k, v = _inputs(bsz, h, hkv, n, d, seed=n, dv=dv)
    r = (block_mean(q, bs) + 0.3 * torch.randn(bsz, h, n // bs, d, dtype=torch.float64)).detach()
    kw = dict(bs=bs, topk=topk, experts_per_query=s, shared=shared, routed=routed)
    o_ref, rt_ref, g_ref = _run("reference", q, k, v, r, **kw)
    o_cpu, rt_cpu, g_cpu = _run("cpu", q, k, v, r, **kw)
    torch.testing.assert_close(o_cpu, o_ref, atol=1e-12, rtol=1e-10)
    for name, a, b in zip("qkv", g_cpu, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"grad of {name}")
    if n // bs > 0 and shared:
        torch.testing.assert_close(g_cpu[3], g_ref[3], atol=1e-11, rtol=1e-9, msg="grad of landmarks")
    elif g_cpu[3] is not None:  # landmarks only route (or are never used): no gradient reaches them
        assert (g_cpu[3] == 0).all()
    assert torch.equal(rt_cpu.expert_index, rt_ref.expert_index)
    assert torch.equal(rt_cpu.key_index.sort(-1).values, rt_ref.key_index.sort(-1).values)
    assert rt_cpu.horizon == "frozen" and rt_cpu.block_size == bs


@needs_tools
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_router_gate_matches_reference_on_every_case(case):
    """``router_gate=True`` (carried by the kernel's backward; this file also runs under the sanitizer and
    target-CPU builds): the forward bit for bit as without the gate, every gradient as the reference's."""
    bsz, h, hkv, n, d, dv, bs, topk, s, shared, routed = case
    q, k, v = _inputs(bsz, h, hkv, n, d, seed=n + 3, dv=dv)
    g = torch.Generator().manual_seed(n)
    r = block_mean(q, bs) + 0.3 * torch.randn(bsz, h, n // bs, d, generator=g, dtype=torch.float64)
    kw = dict(bs=bs, topk=topk, experts_per_query=s, shared=shared, routed=routed, router_gate=True)
    o_ref, _, g_ref = _run("reference", q, k, v, r, **kw)
    o_cpu, rt_cpu, g_cpu = _run("cpu", q, k, v, r, **kw)
    o_off, rt_off, _ = _run("cpu", q, k, v, r, **{**kw, "router_gate": False})
    assert torch.equal(o_cpu, o_off) and torch.equal(rt_cpu.expert_index, rt_off.expert_index)
    torch.testing.assert_close(o_cpu, o_ref, atol=1e-12, rtol=1e-10)
    for name, a, b in zip("qkv", g_cpu, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"grad of {name}")
    if n // bs > 0:  # shared or routed: the landmarks get the shared logits' and the gate's gradients
        torch.testing.assert_close(g_cpu[3], g_ref[3], atol=1e-11, rtol=1e-9, msg="grad of landmarks")


@needs_tools
def test_custom_scales_and_strided_inputs():
    q, k, v = _inputs(2, 4, 2, 45, 6, seed=8)
    r = block_mean(q, 5)
    kw = dict(bs=5, topk=7, experts_per_query=2, scale=0.7, landmark_scale=0.3)
    o_ref, _, g_ref = _run("reference", q, k, v, r, **kw)
    o_cpu, _, g_cpu = _run("cpu", q, k, v, r, **kw)
    torch.testing.assert_close(o_cpu, o_ref, atol=1e-12, rtol=1e-10)
    for name, a, b in zip("qkvr", g_cpu, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"grad of {name}")
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, d] underneath, as a projection's
    assert torch.equal(
        _op(strided, k, v, r, bs=5, topk=7, backend="cpu"), _op(q, k, v, r, bs=5, topk=7, backend="cpu")
    )


@needs_tools
def test_float32_and_bfloat16_match_the_float64_reference():
    q, k, v = _inputs(1, 4, 2, 300, 32, seed=3)
    r = block_mean(q, 32)
    ref = _run("reference", q, k, v, r, bs=32, topk=32)
    o32 = _run("cpu", q.float(), k.float(), v.float(), r.float(), bs=32, topk=32)
    assert o32[0].dtype == torch.float32
    torch.testing.assert_close(o32[0].double(), ref[0], atol=2e-5, rtol=1e-4)
    for name, a, b in zip("qkvr", o32[2], ref[2]):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-3, msg=f"grad of {name}")
    # bfloat16: computed in float32 on the rounded inputs (rounding may change the routing, so the
    # reference is taken on the same rounded inputs).
    lo = [t.bfloat16() for t in (q, k, v, r)]
    out = _op(*lo, bs=32, topk=32, backend="cpu")
    assert out.dtype == torch.bfloat16
    ref_lo = _op(*(t.double() for t in lo), bs=32, topk=32, backend="reference")
    assert (out.double() - ref_lo).abs().max() < 0.02


@needs_tools
@pytest.mark.parametrize("s", [1, 2])
def test_gradcheck(s):
    q, k, v = _inputs(1, 2, 1, 11, 3, seed=5)
    r = block_mean(q, 3) + 0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]

    def f(q, k, v, r):
        return _op(q, k, v, r, bs=3, topk=2, backend="cpu", experts_per_query=s)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


@needs_tools
def test_perturbing_position_p_leaves_earlier_outputs_and_gradients_bitwise_unchanged():
    n, bs = 45, 4
    q, k, v = _inputs(2, 4, 2, n, 8, seed=11)
    kw = dict(bs=bs, topk=5, backend="cpu")
    base = {s: _op(q, k, v, experts_per_query=s, **kw) for s in (1, 2)}
    for p in (0, 3, 4, 5, 11, 12, 20, 33, 44):
        for which in range(3):
            x = [t.clone() for t in (q, k, v)]
            x[which][:, :, p:] += 10.0 * torch.randn_like(x[which][:, :, p:])  # from p on
            for s in (1, 2):
                out = _op(*x, experts_per_query=s, **kw)
                assert torch.equal(out[:, :, :p], base[s][:, :, :p]), (p, "qkv"[which], s)
                assert not torch.equal(out[:, :, p:], base[s][:, :, p:])
    # Gradients: d out_i / d (q, k, v)_t is exactly 0 for t > i.
    leaves = [t.clone().requires_grad_() for t in (q[:1, :2], k[:1, :1], v[:1, :1])]
    out = _op(*leaves, **kw)
    for i in (0, 3, 4, 17, 30):
        grads = torch.autograd.grad(out[:, :, i].sum(), leaves, retain_graph=True)
        for name, g in zip("qkv", grads):
            assert (g[:, :, i + 1 :] == 0).all(), (i, name)


@needs_tools
def test_float32_is_bitwise_causal_at_a_larger_size():
    # Many queries share each expert's packed keys here: a query's output must not depend, to the bit,
    # on what later queries route to or on later keys.
    q, k, v = _inputs(1, 2, 1, 520, 16, seed=31, dtype=torch.float32)
    base = _op(q, k, v, bs=32, topk=32, backend="cpu")
    for p in (40, 300, 511):
        x = [t.clone() for t in (q, k, v)]
        for t in x:
            t[:, :, p:] += torch.randn_like(t[:, :, p:])
        assert torch.equal(_op(*x, bs=32, topk=32, backend="cpu")[:, :, :p], base[:, :, :p]), p


@needs_tools
def test_one_and_two_threads_give_the_same_bits():
    q, k, v = _inputs(2, 4, 2, 200, 16, seed=7, dtype=torch.float32)
    r = block_mean(q, 16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run("cpu", q, k, v, r, bs=16, topk=16, experts_per_query=2))
    finally:
        torch.set_num_threads(before)
    (o1, _, g1), (o2, _, g2) = results
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@needs_tools
def test_known_answers_equal_causal_softmax_attention():
    # SPEC §5.6: shared=False with topk >= N is causal softmax attention once each query's expert holds
    # every key before its block. With the frozen horizon that is the latest landmark beta - 1 (keys
    # t < beta b), so the landmarks are built to route there: r_j = (j + 1) e_0 and q . e_0 > 0.
    q, k, v = _inputs(2, 2, 1, 37, 8, seed=9)
    q[..., 0] = q[..., 0].abs() + 0.5
    r = torch.zeros(2, 2, 37 // 4, 8, dtype=torch.float64)
    r[..., 0] = torch.arange(1, 37 // 4 + 1, dtype=torch.float64)
    sdpa = F.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), is_causal=True)
    out, routing = _op(q, k, v, r, bs=4, topk=64, backend="cpu", shared=False, return_routing=True)
    beta = torch.arange(37) // 4
    assert torch.equal(routing.expert_index[..., 0], (beta - 1).expand(2, 2, 37))
    torch.testing.assert_close(out, sdpa, atol=1e-12, rtol=1e-10)
    small = _op(q[:, :, :6], k[:, :, :6], v[:, :, :6], bs=8, topk=3, backend="cpu")
    sdpa_small = F.scaled_dot_product_attention(
        q[:, :, :6], k[:, :, :6].expand(-1, 2, -1, -1), v[:, :, :6].expand(-1, 2, -1, -1), is_causal=True
    )
    torch.testing.assert_close(small, sdpa_small, atol=1e-12, rtol=1e-10)


@needs_tools
def test_key_sets_are_the_masked_top_k_and_unfilled_slots_are_minus_one():
    q, k, v = _inputs(1, 2, 2, 22, 4, seed=13)
    _, routing = _op(q, k, v, bs=4, topk=6, backend="cpu", return_routing=True)
    ki = routing.key_index  # [1, 2, 5, 6]
    assert ki.shape == (1, 2, 5, 6)
    assert (ki[:, :, 0, 4:] == -1).all() and torch.equal(ki[:, :, 0, :4], torch.arange(4).expand(1, 2, 4))
    r = block_mean(q, 4)
    scores = r @ k.transpose(-1, -2)
    for j in range(1, 5):
        visible = scores[:, :, j, : (j + 1) * 4]
        want = visible.topk(6, dim=-1).indices.sort(-1).values
        assert torch.equal(ki[:, :, j], want)  # increasing index order
    assert (routing.expert_index[:, :, :4] == -1).all() and (routing.expert_index[:, :, 4:] >= 0).all()


@needs_tools
def test_auto_picks_the_kernel_for_frozen_on_cpu_and_torch_for_prefix():
    q, k, v = _inputs(1, 2, 2, 30, 4, seed=2)
    p_frozen = causal_op.validate_causal(
        q, k, v, block_mean(q, 4), topk=3, block_size=4, landmark_horizon="frozen", experts_per_query=1,
        scale=None, landmark_scale=None, shared=True, routed=True, dedup=False, key_padding_mask=None,
        backend="auto",
    )  # fmt: skip
    assert causal_op._resolve_causal_backend("auto", p_frozen, q.device) == "cpu"
    prefix = p_frozen.__class__(**{**p_frozen.__dict__, "horizon": "prefix"})
    assert causal_op._resolve_causal_backend("auto", prefix, q.device) == "torch"
    auto = _op(q, k, v, bs=4, topk=3, backend="auto")
    assert torch.equal(auto, _op(q, k, v, bs=4, topk=3, backend="cpu"))
    torch.testing.assert_close(auto, _op(q, k, v, bs=4, topk=3, backend="torch"), atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="landmark_horizon='frozen' only"):
        mita_causal_attention(
            q, k, v, block_mean(q, 4), topk=3, block_size=4, landmark_horizon="prefix", backend="cpu"
        )


def test_unavailable_kernel_raises_for_cpu_and_falls_back_for_auto(fresh_state, recwarn):
    fresh_state.setenv("MITA_CPU_KERNEL", "0")
    q, k, v = _inputs(1, 2, 2, 30, 4, seed=2)
    with pytest.raises(RuntimeError, match=r"backend='cpu' is unavailable: disabled by MITA_CPU_KERNEL=0"):
        _op(q, k, v, bs=4, topk=3, backend="cpu")
    assert torch.equal(
        _op(q, k, v, bs=4, topk=3, backend="auto"), _op(q, k, v, bs=4, topk=3, backend="torch")
    )
    assert not [w for w in recwarn if "CPU kernel" in str(w.message)]


@needs_tools
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager_forward_and_gradients():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 50, 8, seed=4))

    def f(q, k, v):
        return _op(q, k, v, bs=8, topk=4, backend="cpu", experts_per_query=2)

    eager = f(q, k, v)
    g_eager = torch.autograd.grad((eager * eager).sum(), (q, k, v))
    compiled = torch.compile(f, fullgraph=True)(q, k, v)  # the custom ops' fake kernels trace it
    g_compiled = torch.autograd.grad((compiled * compiled).sum(), (q, k, v))
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@needs_tools
@pytest.mark.slow
def test_custom_ops_pass_opcheck():
    # Fake kernels, schemas and registered autograd of the torch.library ops used under torch.compile.
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 21, 4, seed=6))
    r = block_mean(q, 4).detach().requires_grad_()
    a, _, key_index = kernels.cpu_causal_landmarks(r, k, v, 0.5, 4, 3, True)
    torch.library.opcheck(kernels.cpu_causal_landmarks, (r, k, v, 0.5, 4, 3, True))
    a = a.detach().requires_grad_()
    for values in (a, None):
        for gate in (False, True):  # the router gate: the backward's extra terms, landmarks included
            args = (q, k, v, r, values, key_index, None, 0.5, 0.25, 4, True, gate)
            torch.library.opcheck(kernels.cpu_causal_attention, args)
