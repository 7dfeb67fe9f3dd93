"""MiTACausal's routers (``router=``): the forward pass, decoding and causality they keep, the
distillation loss against a hand computation, and the gradients each one adds."""

from __future__ import annotations

import pytest
import torch

from mita.landmarks import block_mean
from mita.nn.causal import ROUTERS, MiTACausal
from mita.nn.causal_router import attach_loss, routing_distillation_loss
from mita.ops.causal import CausalRouting
from mita.ops.causal.common import validate_causal
from mita.ops.causal.reference import causal_reference_forward


def _qkv(b=2, h=2, n=19, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _grads(mixer, qkv, seed=0):
    leaves = [t.clone().requires_grad_() for t in qkv]
    torch.manual_seed(seed)  # the distillation's query sample
    out = mixer(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_leaves_inference_and_decoding_as_argmax(router):
    opts = {"block_size": 4, "topk": 3, "landmark_horizon": "frozen"}
    qkv = _qkv()
    mixer, plain = MiTACausal(router=router, **opts).eval(), MiTACausal(router="argmax", **opts).eval()
    out = mixer(*qkv)
    assert torch.equal(out, plain(*qkv))
    cache, outs, s = mixer.new_cache(), [], 0
    for c in (5, 1, 3, 4, 6):
        outs.append(cache.append(*(t[:, :, s : s + c] for t in qkv)))
        s += c
    torch.testing.assert_close(torch.cat(outs, 2), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("horizon", ["prefix", "frozen"])
def test_gate_and_distill_keep_the_training_forward_and_add_their_gradients(horizon):
    opts = {"block_size": 4, "topk": 3, "landmark_horizon": horizon}
    qkv = _qkv()
    o_arg, g_arg = _grads(MiTACausal(router="argmax", **opts), qkv)
    o_gate, g_gate = _grads(MiTACausal(router="gate", **opts), qkv)
    o_both, g_both = _grads(MiTACausal(router="gate+distill", distill_weight=0.5, **opts), qkv)
    assert torch.equal(o_gate, o_arg) and torch.equal(o_both, o_arg)
    assert torch.equal(g_gate[1], g_arg[1]) and not torch.allclose(g_gate[0], g_arg[0])
    # gate + distill = gate + the gradient of the distillation loss alone (the same query sample)
    q, k, v = (t.clone().requires_grad_() for t in qkv)
    _, routing = causal_reference_forward(
        validate_causal(q, k, v, block_mean(q, 4), topk=3, block_size=4, landmark_horizon=horizon,
                        experts_per_query=1, scale=None, landmark_scale=None, shared=True, routed=True,
                        dedup=False, key_padding_mask=None, backend="reference"),
        q, k, v, block_mean(q, 4),
    )  # fmt: skip
    torch.manual_seed(0)
    terms, rows = routing_distillation_loss(
        q, k, block_mean(q, 4), routing, scale=8**-0.5, landmark_scale=1 / 8, queries=32
    )
    assert terms.shape == (2, 2, 32) and rows.shape == (2, 32) and bool((rows >= 4).all())
    dq, dk = torch.autograd.grad(0.5 * terms.mean(), (q, k), allow_unused=True)
    torch.testing.assert_close(g_both[0], g_gate[0] + dq, atol=1e-12, rtol=1e-10)
    assert dk is None and torch.equal(g_both[1], g_gate[1])  # the teacher is detached: no key gradient


def test_distillation_loss_by_hand():
    """Frozen, b = 2, N = 6: query 5 (block 2) sees landmarks 0 and 1 and keys 0..3."""
    q, k, _ = _qkv(b=1, h=1, n=6, d=3, seed=4)
    r = block_mean(q, 2)
    kset = torch.tensor([[[[0, 1], [3, 1], [2, 4]]]])  # landmark sets (landmark 2 is never visible here)
    routing = CausalRouting(torch.zeros(1, 1, 6, 1, dtype=torch.long), kset, "frozen", 2)

    gen = torch.Generator().manual_seed(0)
    pos = 2 + torch.randint(4, (1, 1), generator=torch.Generator().manual_seed(0))  # the sampled query
    i = int(pos)
    beta = i // 2
    p = torch.softmax(q[0, 0, i] @ k[0, 0, : 2 * beta].T * 3**-0.5, -1)
    mass = torch.stack([sum(p[t] for t in kset[0, 0, j].tolist() if t < 2 * beta) for j in range(beta)])
    target = mass / mass.sum()
    logpi = torch.log_softmax(q[0, 0, i] @ r[0, 0, :beta].T / 3, -1)
    want = (target * (target.log() - logpi)).sum()
    got, rows = routing_distillation_loss(
        q, k, r, routing, scale=3**-0.5, landmark_scale=1 / 3, queries=1, generator=gen
    )
    assert rows.tolist() == [[i]]
    torch.testing.assert_close(got[0, 0, 0], want)


def test_grouped_changes_the_training_forward_only_and_stays_causal():
    opts = {"block_size": 4, "topk": 3, "landmark_horizon": "frozen"}
    q, k, v = _qkv(b=1, h=1, n=13)
    mixer = MiTACausal(router="grouped", **opts)
    out = mixer(q, k, v)
    assert not torch.allclose(out, MiTACausal(router="argmax", **opts)(q, k, v))
    assert torch.equal(mixer.eval()(q, k, v), MiTACausal(router="argmax", **opts).eval()(q, k, v))
    mixer.train()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = mixer(*leaves)
    for i in (3, 4, 9):
        for g in torch.autograd.grad(out[0, 0, i].sum(), leaves, retain_graph=True):
            assert torch.count_nonzero(g[0, 0, i + 1 :]) == 0


def test_attach_loss_is_an_identity_that_adds_each_term_through_its_row():
    x = torch.randn(1, 1, 4, 2, requires_grad=True)
    w = torch.randn(1, 1, 2, requires_grad=True)
    out = attach_loss(x * 2, w**2, torch.tensor([[1, 3]]))  # term 0 belongs to row 1, term 1 to row 3
    assert torch.equal(out, x.detach() * 2)
    (gw,) = torch.autograd.grad(out[0, 0, 1].sum(), w, retain_graph=True)  # row 1 only: term 0 only
    torch.testing.assert_close(gw, torch.stack([2 * w[0, 0, 0], torch.zeros(())]).view(1, 1, 2).detach())
    out.sum().backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())
    torch.testing.assert_close(x.grad, torch.full((1, 1, 4, 2), 2.0))


@pytest.mark.parametrize("horizon", ["prefix", "frozen"])
def test_distillation_keeps_every_output_free_of_later_positions_in_training(horizon):
    mixer = MiTACausal(
        block_size=4, topk=3, landmark_horizon=horizon, router="gate+distill", distill_queries=8
    )
    leaves = [t.requires_grad_() for t in _qkv(b=1, h=1, n=13)]
    torch.manual_seed(0)
    out = mixer(*leaves)
    for i in (3, 4, 8, 12):
        for g in torch.autograd.grad(out[0, 0, i].sum(), leaves, retain_graph=True):
            assert torch.count_nonzero(g[0, 0, i + 1 :]) == 0, i


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"router": "topk"}, "router must be one of"),
        ({"router": "grouped", "landmark_horizon": "prefix"}, "grouped"),
        ({"distill_queries": 0}, "distill_queries"),
    ],
)
def test_bad_router_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        MiTACausal(**kw)
