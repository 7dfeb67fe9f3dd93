"""Causal MiTA's trainable-routing options against the dense reference: the straight-through router gate
(``router_gate``, every backend, the fused cpu kernel path included) and grouped training (``grouped``):
forward, every gradient, float64 gradcheck, GQA, s = 2, N % b != 0, exact causality."""

from __future__ import annotations

import pytest
import torch

from mita import mita_attention, mita_causal_attention
from mita.landmarks import block_mean
from mita.ops.causal import common, torch_backend
from mita.ops.cpu import build

needs_tools = pytest.mark.skipif(build._missing_tools() is not None, reason="no C++ compiler or ninja")


def _inputs(b, h, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, generator=g, dtype=torch.float64) for hh in (h, hkv, hkv))
    r = block_mean(q, 4) + 0.3 * torch.randn(b, h, n // 4, d, generator=g, dtype=torch.float64)
    return q, k, v, r


def _run(backend, q, k, v, r, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]
    out = mita_causal_attention(*leaves, topk=3, block_size=4, backend=backend, landmark_scale=0.4, **kw)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return out.detach(), [t.grad for t in leaves]


# (B, H, Hkv, N, d, s, shared): N % b != 0, GQA, s = 2, the routed expert alone.
CASES = [
    (2, 2, 2, 21, 4, 1, True),
    (1, 4, 2, 19, 5, 1, True),
    (1, 2, 1, 26, 4, 2, True),
    (1, 2, 2, 18, 4, 1, False),
]
GATE_BACKENDS = [("torch", "prefix"), ("torch", "frozen"), pytest.param("cpu", "frozen", marks=needs_tools)]


@pytest.mark.parametrize("backend,horizon", GATE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_router_gate_matches_reference_and_changes_only_the_routing_gradients(backend, horizon, case):
    bsz, h, hkv, n, d, s, shared = case
    q, k, v, r = _inputs(bsz, h, hkv, n, d, seed=n)
    kw = dict(landmark_horizon=horizon, experts_per_query=s, shared=shared)
    o_ref, g_ref = _run("reference", q, k, v, r, router_gate=True, **kw)
    o_gate, g_gate = _run(backend, q, k, v, r, router_gate=True, **kw)
    o_off, g_off = _run(backend, q, k, v, r, **kw)
    torch.testing.assert_close(o_gate, o_ref, atol=1e-12, rtol=1e-10)
    for name, a, b in zip("qkvr", g_gate, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"grad of {name}")
    # bit for bit: the forward, and the key and value gradients (the gate reaches q . r_j only); prefix with
    # s > 1 splits the routed part per expert, equal to rounding
    same = torch.equal if not (horizon == "prefix" and s > 1) else torch.allclose
    assert same(o_gate, o_off) and same(g_gate[1], g_off[1]) and same(g_gate[2], g_off[2])
    assert not torch.allclose(g_gate[0], g_off[0])
    assert (
        g_off[3] is None if not shared else not torch.allclose(g_gate[3], g_off[3])
    )  # shared=False: routes only


@needs_tools
@pytest.mark.parametrize("case", CASES + [(1, 4, 2, 23, 4, 2, False)], ids=lambda c: "-".join(map(str, c)))
def test_cpu_gate_is_carried_by_the_kernel_without_torch_recomputation(monkeypatch, case):
    """The fused path's gate gradient comes from the kernel's backward: neither the torch routed part
    (``_routed_tiles``) nor the torch gate (``router_gate_shift``) is called, and every gradient still
    matches the dense reference (float64; GQA, s = 2, N % b != 0, and with ``shared=False`` the landmarks'
    gradient is the gate's alone)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the cpu gate fell back to torch code")

    for module, name in ((torch_backend, "_routed_tiles"), (torch_backend, "router_gate_shift"),
                         (common, "router_gate_shift")):  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    bsz, h, hkv, n, d, s, shared = case
    q, k, v, r = _inputs(bsz, h, hkv, n, d, seed=n + 1)
    kw = dict(landmark_horizon="frozen", experts_per_query=s, shared=shared, router_gate=True)
    o_ref, g_ref = _run("reference", q, k, v, r, **kw)
    o_cpu, g_cpu = _run("cpu", q, k, v, r, **kw)
    torch.testing.assert_close(o_cpu, o_ref, atol=1e-12, rtol=1e-10)
    for name, a, b in zip("qkvr", g_cpu, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=lambda c: "-".join(map(str, c)))
def test_grouped_matches_reference(case):
    bsz, h, hkv, n, d, _, shared = case
    q, k, v, r = _inputs(bsz, h, hkv, n, d, seed=n)
    kw = dict(landmark_horizon="frozen", shared=shared, grouped=True)
    o_ref, g_ref = _run("reference", q, k, v, r, **kw)
    for backend in ("torch", "auto"):  # "auto" runs grouped training on the torch backend
        out, grads = _run(backend, q, k, v, r, **kw)
        torch.testing.assert_close(out, o_ref, atol=1e-12, rtol=1e-10)
        for name, a, b in zip("qkvr", grads, g_ref):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"grad of {name}")


def test_grouped_with_one_landmark_equals_the_argmax_path():
    """With a single visible landmark pi = 1: grouped training is exactly the argmax routing."""
    q, k, v, r = _inputs(1, 2, 2, 11, 4, seed=2)  # blocks 0, 1, 2 (partial): block 2 sees landmarks 0, 1
    grouped, _ = _run("torch", q[:, :, :8], k[:, :, :8], v[:, :, :8], r[:, :, :2], landmark_horizon="frozen")
    plain, _ = _run(
        "torch", q[:, :, :8], k[:, :, :8], v[:, :, :8], r[:, :, :2], landmark_horizon="frozen", grouped=True
    )
    torch.testing.assert_close(grouped, plain, atol=1e-14, rtol=0)


# The gate's gradient is straight-through, not the derivative of the forward (which it leaves unchanged),
# so gradcheck applies to grouped training only; the gate is checked against the reference above.
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_grouped_gradcheck(backend):
    kw = {"grouped": True, "landmark_horizon": "frozen"}
    q, k, v, r = (t.requires_grad_() for t in _inputs(1, 2, 1, 13, 3, seed=5))

    def f(q, k, v, r):
        return mita_causal_attention(q, k, v, r, topk=3, block_size=4, backend=backend, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v, r), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "backend,kw",
    [
        ("reference", {"router_gate": True, "landmark_horizon": "prefix"}),
        ("torch", {"router_gate": True, "landmark_horizon": "prefix"}),
        ("torch", {"router_gate": True, "landmark_horizon": "frozen"}),
        pytest.param("cpu", {"router_gate": True, "landmark_horizon": "frozen"}, marks=needs_tools),
        ("reference", {"grouped": True, "landmark_horizon": "frozen"}),
        ("torch", {"grouped": True, "landmark_horizon": "frozen"}),
    ],
)
def test_bitwise_causality_and_zero_future_gradients(backend, kw):
    q, k, v, _ = _inputs(1, 2, 2, 19, 4, seed=7)

    def f(q, k, v):
        return mita_causal_attention(q, k, v, block_mean(q, 4), topk=3, block_size=4, backend=backend, **kw)

    ref = f(q, k, v)
    for p in (3, 4, 9, 16):
        for which in range(3):
            pert = [t.clone() for t in (q, k, v)]
            pert[which][:, :, p:] += 3 * torch.randn_like(pert[which][:, :, p:])
            assert torch.equal(f(*pert)[:, :, :p], ref[:, :, :p]), (p, which)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = f(*leaves)
    for i in (2, 5, 12):
        for g in torch.autograd.grad(out[:, :, i].sum(), leaves, retain_graph=True):
            assert torch.count_nonzero(g[:, :, i + 1 :]) == 0, i


def test_bad_options_raise():
    q, k, v, r = _inputs(1, 2, 2, 16, 4, seed=0)
    with pytest.raises(ValueError, match="grouped"):
        mita_causal_attention(q, k, v, r, topk=3, block_size=4, landmark_horizon="prefix", grouped=True)
    with pytest.raises(ValueError, match="grouped"):
        mita_causal_attention(q, k, v, r, topk=3, block_size=4, landmark_horizon="frozen", grouped=True,
                       backend="cpu")  # fmt: skip
    with pytest.raises(TypeError, match="router_gate"):  # a causal-only option: the causal op's alone
        mita_attention(q, k, v, r, topk=3, router_gate=True)
    with pytest.raises(ValueError, match="router_gate"):
        mita_causal_attention(q, k, v, r, topk=3, block_size=4, landmark_horizon="prefix", router_gate="yes")
