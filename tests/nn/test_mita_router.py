"""MiTAAttention's routers (``router=``): routing distillation keeps the forward output bit for bit, adds
exactly the gradient of its loss in training and nothing in eval, and the loss matches an explicit
float64 computation (with key padding and grouped-query attention)."""

from __future__ import annotations

import pytest
import torch

import mita.nn.mita as mita_module
from mita import mita_attention
from mita.nn import MiTAAttention
from mita.nn.router import routing_distillation_loss

OPTS = {"num_landmarks": 4, "topk": 3, "backend": "torch", "dtype": torch.float64}


def _pair(router="distill", **kw):
    """An argmax and a distilling module with the same weights."""
    torch.manual_seed(0)
    plain = MiTAAttention(16, 2, router="argmax", **OPTS, **kw)
    distill = MiTAAttention(16, 2, router=router, distill_weight=0.5, distill_queries=5, **OPTS, **kw)
    distill.load_state_dict(plain.state_dict())
    return plain, distill


def _run(module, x, mask=None, seed=0):
    """Output and input gradient under a fixed output gradient; ``seed`` fixes the sampled queries."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, key_padding_mask=mask)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    if mask is not None:
        g = g.masked_fill(mask[..., None], 0.0)  # padded rows feed nothing, as in a model
    out.backward(g)
    return out.detach(), x.grad


def _x(b=2, n=17, seed=2):
    return torch.randn(b, n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("router", ["distill", "distill+select"])
@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 1}, {"layout": "seq", "prefix_tokens": 0}])
@pytest.mark.parametrize("padded", [False, True])
def test_distill_keeps_the_output_and_adds_exactly_its_loss_gradient(router, kw, padded, monkeypatch):
    plain, distill = _pair(router, **kw)
    x = _x()
    mask = torch.zeros(2, 17, dtype=torch.bool)
    if padded:
        mask[1, 12:] = True
    mask = mask if padded else None
    captured = []

    def spy(*args, **kwargs):
        terms, rows = routing_distillation_loss(*args, **kwargs)
        captured.append((terms, rows, kwargs["key_padding_mask"]))
        assert kwargs["select_weight"] == (1.0 if router == "distill+select" else 0.0)
        return terms, rows

    monkeypatch.setattr(mita_module, "routing_distillation_loss", spy)
    o_plain, g_plain = _run(plain, x, mask)
    xd = x.clone().requires_grad_()
    torch.manual_seed(0)
    out = distill(xd, key_padding_mask=mask)
    assert torch.equal(out, o_plain)  # bit for bit
    ((terms, rows, seen_mask),) = captured
    assert terms.shape == (2, 2, 5) and rows.shape == (2, 5)
    if padded:
        assert torch.equal(seen_mask, mask) and bool((rows[1] < 12).all())  # no padded query sampled
    (d_loss,) = torch.autograd.grad(0.5 * terms.mean(), xd, retain_graph=True)
    assert d_loss.abs().max() > 0
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    if mask is not None:
        g = g.masked_fill(mask[..., None], 0.0)
    out.backward(g)
    torch.testing.assert_close(xd.grad, g_plain + d_loss, rtol=1e-10, atol=1e-12)


def test_eval_and_no_grad_add_nothing():
    plain, distill = _pair()
    x = _x()
    for m in (plain, distill):
        m.eval()
    o_plain, g_plain = _run(plain, x)
    o_dist, g_dist = _run(distill, x)
    assert torch.equal(o_dist, o_plain) and torch.equal(g_dist, g_plain)
    distill.train()
    with torch.no_grad():
        assert torch.equal(distill(x), plain.train()(x))


def test_zero_weight_adds_nothing():
    plain, _ = _pair()
    distill = MiTAAttention(16, 2, router="distill", distill_weight=0.0, **OPTS)
    distill.load_state_dict(plain.state_dict())
    x = _x()
    o_plain, g_plain = _run(plain, x)
    o_dist, g_dist = _run(distill, x)
    assert torch.equal(o_dist, o_plain) and torch.equal(g_dist, g_plain)


def test_loss_and_gradient_against_an_explicit_float64_computation():
    """GQA (4 query heads on 2 key heads) with one padded sequence (NaN keys); the explicit loop follows the
    definition: dense softmax over the real keys, its mass in each landmark's key set, KL to the router."""
    b, h, hkv, n, d, m, kk = 2, 4, 2, 9, 3, 3, 4
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    r = torch.randn(b, h, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, 6:] = True
    k[1, :, 6:] = float("nan")  # padding is outside the teacher: what it holds never matters
    k.requires_grad_()
    _, routing = mita_attention(
        q, k, v, r, topk=kk, key_padding_mask=mask, backend="reference", return_routing=True
    )
    ki = routing.key_index
    c, lam = d**-0.5, 0.7
    terms, rows = routing_distillation_loss(
        q, k, r, ki, scale=c, landmark_scale=lam, queries=6, key_padding_mask=mask,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert bool((rows[1] < 6).all())
    want = torch.zeros(b, h, 6, dtype=torch.float64)
    for bi in range(b):
        real = [t for t in range(n) if not mask[bi, t]]
        for hi in range(h):
            for s, i in enumerate(rows[bi].tolist()):
                qi = q[bi, hi, i]
                logits = [c * qi.detach() @ k[bi, hi // 2, t].detach() for t in real]
                pt = dict(zip(real, torch.softmax(torch.stack(logits), 0)))
                sets = [set(ki[bi, hi, j].tolist()) for j in range(m)]  # a key counts once per set
                mass = torch.stack([sum(pt.get(t, 0.0) for t in kset) for kset in sets])
                target = mass / mass.sum()
                logpi = torch.log_softmax(lam * (r[bi, hi] @ qi), 0)
                want[bi, hi, s] = (target * (target.log() - logpi)).sum()
    torch.testing.assert_close(terms, want, rtol=1e-10, atol=1e-12)
    w = torch.randn(terms.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((w * terms).sum(), (q, r), retain_graph=True)
    ref = torch.autograd.grad((w * want).sum(), (q, r))
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    (dk,) = torch.autograd.grad(terms.sum(), k, allow_unused=True)
    assert dk is None  # the teacher is detached


def test_selection_term_against_an_explicit_float64_computation():
    """GQA and one padded sequence (NaN keys): the selection term is
    ``sum_j pi_ij * -sum_t p_i(t) log softmax_t(c r_j . k_t)`` over the real keys, ``pi`` detached; its
    gradient reaches the landmarks and the real keys only."""
    b, h, hkv, n, d, m = 2, 4, 2, 9, 3, 3
    g = torch.Generator().manual_seed(6)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    r = torch.randn(b, h, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, 6:] = True
    k[1, :, 6:] = float("nan")
    k.requires_grad_()
    ki = torch.zeros(b, h, m, 2, dtype=torch.long)  # the key sets do not enter the selection term
    c, lam = d**-0.5, 0.7
    args = dict(scale=c, landmark_scale=lam, queries=6, key_padding_mask=mask)
    base, rows = routing_distillation_loss(q, k, r, ki, generator=torch.Generator().manual_seed(3), **args)
    both, rows2 = routing_distillation_loss(
        q, k, r, ki, generator=torch.Generator().manual_seed(3), select_weight=0.4, **args
    )
    assert torch.equal(rows, rows2)
    want = torch.zeros(b, h, 6, dtype=torch.float64)
    for bi in range(b):
        real = [t for t in range(n) if not mask[bi, t]]
        for hi in range(h):
            kr = k[bi, hi // 2, real]
            for s, i in enumerate(rows[bi].tolist()):
                p = torch.softmax(c * q[bi, hi, i] @ kr.detach().T, 0)
                pi = torch.softmax(lam * (r[bi, hi] @ q[bi, hi, i]), 0).detach()
                for j in range(m):
                    want[bi, hi, s] -= pi[j] * (p * torch.log_softmax(c * r[bi, hi, j] @ kr.T, 0)).sum()
    torch.testing.assert_close(both - base, 0.4 * want, rtol=1e-10, atol=1e-12)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((w * (both - base)).sum(), (r, k))
    ref = torch.autograd.grad((0.4 * w * want).sum(), (r, k))
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert bool(torch.isfinite(got[1]).all()) and torch.count_nonzero(got[1][1, :, 6:]) == 0


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"router": "gate"}, "router must be one of"),
        ({"router": "distill+select", "routed": False}, "routed=True"),
        ({"select_weight": float("inf")}, "select_weight"),
        ({"router": "distill", "routed": False}, "routed=True"),
        ({"distill_queries": 0}, "distill_queries"),
        ({"distill_weight": -1.0}, "distill_weight"),
        ({"distill_weight": float("nan")}, "distill_weight"),
    ],
)
def test_bad_router_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        MiTAAttention(16, 2, **kw)
