"""MiTACausal's and MoBACausal's routers (``router=``): the forward pass, decoding and causality they
keep, the distillation losses against hand computations, and the gradients each one adds (MoBA's gate
against finite differences)."""

from __future__ import annotations

import pytest
import torch

from mita.landmarks import block_mean
from mita.nn.causal import MOBA_ROUTERS, ROUTERS, MiTACausal, MoBACausal
from mita.nn.causal_router import (
    attach_loss,
    block_distillation_loss,
    dense_teacher,
    objective_rows,
    routing_distillation_loss,
    sample_rows,
    selection_cross_entropy,
)
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


@pytest.mark.parametrize("horizon", ["frozen", "prefix"])
def test_selection_cross_entropy_by_hand(horizon):
    """Each sampled query i, each landmark j it can see, with weight pi_ij: the cross-entropy of the
    teacher on j's horizon against log_softmax(c r_j . k_t) over that horizon."""
    q, k, _ = _qkv(b=1, h=2, n=19, d=8, seed=3)
    r, rows = block_mean(q, 4), torch.tensor([[5, 9, 13, 18, 4]])
    teacher = dense_teacher(q[:, :, rows[0]], k, rows, 4, 8**-0.5)
    visible = torch.arange(r.shape[2])[None, None, :] < (rows // 4)[:, :, None]
    pi = torch.softmax(
        torch.randn(1, 2, 5, r.shape[2], dtype=q.dtype).masked_fill(~visible[:, None], -torch.inf), -1
    )
    got = selection_cross_entropy(teacher, pi, k, r, rows, block_size=4, scale=8**-0.5, horizon=horizon)
    want = torch.zeros(1, 2, 5, dtype=q.dtype)
    for h in range(2):
        for s, i in enumerate(rows[0].tolist()):
            for j in range(i // 4):
                end = (j + 1) * 4 if horizon == "frozen" else (i // 4) * 4
                logs = torch.log_softmax(8**-0.5 * r[0, h, j] @ k[0, h, :end].T, -1)
                want[0, h, s] -= pi[0, h, s, j] * (teacher[0, h, s, :end] * logs).sum()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert bool((got > 0).all())


@pytest.mark.parametrize("horizon", ["prefix", "frozen"])
def test_select_weight_adds_the_selection_gradient_to_queries_and_keys(horizon):
    opts = {"block_size": 4, "topk": 3, "landmark_horizon": horizon}
    qkv = _qkv()
    o_base, g_base = _grads(MiTACausal(router="gate+distill", **opts), qkv)
    o_sel, g_sel = _grads(MiTACausal(router="gate+distill+select", select_weight=0.7, **opts), qkv)
    assert torch.equal(o_sel, o_base) and torch.equal(g_sel[2], g_base[2])
    q, k, v = (t.clone().requires_grad_() for t in qkv)
    r = block_mean(q, 4)
    _, routing = causal_reference_forward(
        validate_causal(q, k, v, r, topk=3, block_size=4, landmark_horizon=horizon, experts_per_query=1,
                        scale=None, landmark_scale=None, shared=True, routed=True, dedup=False,
                        key_padding_mask=None, backend="reference"),
        q, k, v, r,
    )  # fmt: skip

    def loss(select_weight):
        torch.manual_seed(0)
        terms, _ = routing_distillation_loss(
            q, k, r, routing, scale=8**-0.5, landmark_scale=1 / 8, queries=32, select_weight=select_weight
        )
        return terms.mean()

    dq, dk = torch.autograd.grad(loss(0.7) - loss(0.0), (q, k))
    assert bool(dk.abs().sum() > 0)
    torch.testing.assert_close(g_sel[0], g_base[0] + dq, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g_sel[1], g_base[1] + dk, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("s", [1, 2])
def test_default_router_gradients_match_the_reference_on_every_backend(backend, s):
    """The default router (gate, distillation, key selection) in float64, N % b != 0: the fused kernel and
    the torch backend give the reference's output and every gradient (the same sampled queries)."""
    opts = {"block_size": 4, "topk": 3, "landmark_horizon": "frozen", "experts_per_query": s}
    qkv = _qkv()
    o_ref, g_ref = _grads(MiTACausal(backend="reference", **opts), qkv)
    o, g = _grads(MiTACausal(backend=backend, **opts), qkv)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-10)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)


def test_default_select_weight_scales_with_the_block():
    """The term reaches each query through its block mean (1/b of it per query): min(0.3, b / 64)."""
    assert MiTACausal(block_size=8).select_weight == 0.125
    assert MiTACausal(block_size=64).select_weight == 0.3 == MiTACausal(block_size=256).select_weight
    assert MiTACausal(block_size=8, select_weight=0.7).select_weight == 0.7


def test_distillation_draws_its_queries_among_the_rows_the_objective_reads():
    read = torch.zeros(3, 19, dtype=torch.bool)
    read[0, [5, 17]] = True
    read[1, 2] = True  # before block 1 only: nothing to route, so this sequence draws from every row
    read[2, 4:] = True
    gen = torch.Generator().manual_seed(0)
    rows = sample_rows(3, 19, 4, 200, torch.device("cpu"), gen, read)
    assert set(rows[0].tolist()) == {5, 17}
    assert set(rows[1].tolist()) == set(range(4, 19)) == set(rows[2].tolist())
    with pytest.raises(ValueError, match="objective rows must be"):
        sample_rows(3, 18, 4, 8, torch.device("cpu"), gen, read)


@pytest.mark.parametrize(
    "make",
    [
        lambda router: MiTACausal(block_size=4, topk=3, landmark_horizon="frozen", router=router),
        lambda router: MoBACausal(block_size=4, top_blocks=1, router=router),
    ],
    ids=["mita", "moba"],
)
def test_objective_rows_reach_the_mixers_distillation_and_are_cleared(make):
    """With row 9 the only row read, the distillation's gradient is that of row 9's term alone; the
    forward is unchanged and the rows are gone after the block."""
    mixer = make("distill")
    model = torch.nn.Sequential(mixer)
    qkv = _qkv(b=1, h=2, n=14)
    plain = _grads(make("argmax"), qkv)
    read = torch.zeros(1, 14, dtype=torch.bool)
    read[0, 9] = True
    with objective_rows(model, read):
        assert mixer.objective_rows is read
        out, grads = _grads(mixer, qkv)
    assert mixer.objective_rows is None
    with objective_rows(model, None):  # no rows: the mixers keep their default, the uniform draw
        assert mixer.objective_rows is None
    assert torch.equal(out, plain[0])
    q, k = (t.clone().requires_grad_() for t in qkv[:2])
    if isinstance(mixer, MiTACausal):
        _, routing = causal_reference_forward(
            validate_causal(q, k, qkv[2], block_mean(q, 4), topk=3, block_size=4, landmark_horizon="frozen",
                            experts_per_query=1, scale=None, landmark_scale=None, shared=True, routed=True,
                            dedup=False, key_padding_mask=None, backend="reference"),
            q, k, qkv[2], block_mean(q, 4),
        )  # fmt: skip
        terms, rows = routing_distillation_loss(
            q, k, block_mean(q, 4), routing, scale=8**-0.5, landmark_scale=1 / 8, queries=1, read=read
        )
    else:
        terms, rows = block_distillation_loss(
            q,
            k,
            k[:, :, :12].unflatten(2, (3, 4)).mean(3),
            block_size=4,
            scale=8**-0.5,
            gate_scale=1.0,
            queries=1,
            read=read,
        )
    assert rows.tolist() == [[9]]
    dq, dk = torch.autograd.grad(terms.mean(), (q, k), allow_unused=True)
    torch.testing.assert_close(grads[0], plain[1][0] + dq, atol=1e-12, rtol=1e-10)
    if dk is not None:  # MoBA's gate keys are block means of k
        torch.testing.assert_close(grads[1], plain[1][1] + dk, atol=1e-12, rtol=1e-10)


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


@pytest.mark.parametrize(
    "make",
    [
        lambda: MiTACausal(
            block_size=4, topk=3, landmark_horizon="prefix", router="gate+distill", distill_queries=8
        ),
        lambda: MiTACausal(
            block_size=4, topk=3, landmark_horizon="frozen", router="gate+distill", distill_queries=8
        ),
        lambda: MiTACausal(
            block_size=4, topk=3, landmark_horizon="prefix", router="gate+distill+select", distill_queries=8
        ),
        lambda: MiTACausal(
            block_size=4, topk=3, landmark_horizon="frozen", router="gate+distill+select", distill_queries=8
        ),
        lambda: MoBACausal(block_size=4, top_blocks=1, router="gate", distill_queries=8),
        lambda: MoBACausal(block_size=4, top_blocks=1, router="gate+distill", distill_queries=8),
    ],
    ids=[
        "mita-prefix",
        "mita-frozen",
        "mita-prefix-select",
        "mita-frozen-select",
        "moba-gate",
        "moba-gate+distill",
    ],
)
def test_learned_routers_keep_every_output_free_of_later_positions_in_training(make):
    mixer = make()
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
        ({"distill_weight": -1.0}, "distill_weight must be a finite number"),
        ({"select_weight": float("nan")}, "select_weight must be a finite number"),
        ({"select_weight": float("inf")}, "select_weight must be a finite number"),
        ({"select_weight": "1"}, "select_weight must be a finite number"),
        ({"distill_weight": True}, "distill_weight must be a finite number"),
    ],
)
def test_bad_router_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        MiTACausal(**kw)


# MoBACausal's block gate, trained the same way (router=): the gate scores q . mean(K_j) are the logits


def _moba_relaxed(q, k, v, chosen, logpi0, bs):
    """The function whose gradient ``router="gate"`` gives: MoBA's attention with the block choice
    ``chosen`` [B, H, N, nc] fixed and the logits of block ``j``'s keys shifted by
    ``log pi_i(j) - log pi_i(j)|_0`` (``logpi0`` the value at the point of evaluation), by definition."""
    n, d = q.shape[2], q.shape[3]
    nc = chosen.shape[-1]
    gate_keys = k[:, :, : nc * bs].unflatten(2, (nc, bs)).mean(3)
    pos = torch.arange(n)
    past = torch.arange(nc)[None, :] < (pos // bs)[:, None]
    scores = (q @ gate_keys.transpose(-1, -2)).masked_fill(~past, float("-inf"))
    logpi = torch.where(past.any(-1, keepdim=True), torch.log_softmax(scores, -1), 0.0)
    shift = torch.where(chosen, logpi - logpi0, 0.0).repeat_interleave(bs, -1)
    shift = torch.nn.functional.pad(shift, (0, n - nc * bs))
    own = (pos[None, :] // bs == pos[:, None] // bs) & (pos[None, :] <= pos[:, None])
    keep = chosen.repeat_interleave(bs, -1)
    keep = torch.nn.functional.pad(keep, (0, n - nc * bs)) | own
    logits = (q @ k.transpose(-1, -2)) * d**-0.5 + shift
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v, logpi.detach()


@pytest.mark.parametrize("router", MOBA_ROUTERS)
def test_every_moba_router_leaves_inference_and_decoding_as_argmax(router):
    qkv = _qkv()
    mixer = MoBACausal(block_size=4, top_blocks=2, router=router).eval()
    out = mixer(*qkv)
    assert torch.equal(out, MoBACausal(block_size=4, top_blocks=2, router="argmax").eval()(*qkv))
    cache, outs, s = mixer.new_cache(), [], 0
    for c in (5, 1, 3, 4, 6):
        outs.append(cache.append(*(t[:, :, s : s + c] for t in qkv)))
        s += c
    torch.testing.assert_close(torch.cat(outs, 2), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("top_blocks", [1, 2])
def test_moba_gate_and_distill_keep_the_training_forward_and_add_their_gradients(dtype, top_blocks):
    qkv = [t.to(dtype) for t in _qkv()]
    opts = {"block_size": 4, "top_blocks": top_blocks}
    o_arg, g_arg = _grads(MoBACausal(router="argmax", **opts), qkv)
    o_gate, g_gate = _grads(MoBACausal(router="gate", **opts), qkv)
    o_dist, g_dist = _grads(MoBACausal(router="distill", distill_weight=0.5, **opts), qkv)
    o_both, g_both = _grads(MoBACausal(router="gate+distill", distill_weight=0.5, **opts), qkv)
    for o in (o_gate, o_dist, o_both):
        assert torch.equal(o, o_arg)  # bit for bit
    for g in (g_gate, g_dist, g_both):
        assert torch.equal(g[2], g_arg[2])  # the values' gradient is attention's alone
    assert not torch.allclose(g_gate[0], g_arg[0]) and not torch.allclose(g_gate[1], g_arg[1])
    # the distillation's gradient is that of block_distillation_loss alone (the same query sample)
    q, k, _ = (t.clone().requires_grad_() for t in qkv)
    gate_keys = k[:, :, :16].unflatten(2, (4, 4)).mean(3)
    torch.manual_seed(0)
    terms, rows = block_distillation_loss(
        q, k, gate_keys, block_size=4, scale=8**-0.5, gate_scale=1.0, queries=32
    )
    assert terms.shape == (2, 2, 32) and rows.shape == (2, 32) and bool((rows >= 4).all())
    dq, dk = torch.autograd.grad(0.5 * terms.mean(), (q, k))
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(g_dist[0], g_arg[0] + dq, **tol)
    torch.testing.assert_close(g_dist[1], g_arg[1] + dk, **tol)
    torch.testing.assert_close(g_both[0], g_gate[0] + dq, **tol)
    torch.testing.assert_close(g_both[1], g_gate[1] + dk, **tol)


def test_moba_gate_gradient_matches_finite_differences():
    """float64, N = 10, b = 2, two blocks per query: the module's Jacobian (autograd through the
    straight-through gate) equals the central-difference Jacobian of the relaxed function it stands for,
    and that function's autograd passes gradcheck."""
    bs = 2
    q, k, v = _qkv(b=1, h=1, n=10, d=3, seed=5)
    mixer = MoBACausal(block_size=bs, top_blocks=2, router="gate")
    chosen = mixer.select(torch.arange(10), q, k)[..., :5]
    assert chosen.any()
    _, logpi0 = _moba_relaxed(q, k, v, chosen, 0.0, bs)

    def relaxed(q, k, v):
        return _moba_relaxed(q, k, v, chosen, logpi0, bs)[0]

    torch.testing.assert_close(relaxed(q, k, v), mixer(q, k, v), rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(relaxed, [t.clone().requires_grad_() for t in (q, k, v)])
    jac = torch.autograd.functional.jacobian(mixer, (q, k, v))  # 3 x [1, 1, 10, 3, 1, 1, 10, 3]
    eps = 1e-6
    for xi, j_auto in enumerate(jac):
        num = torch.zeros_like(j_auto)
        for idx in range(q.numel()):
            args_p, args_m = [[t.clone() for t in (q, k, v)] for _ in range(2)]
            args_p[xi].view(-1)[idx] += eps
            args_m[xi].view(-1)[idx] -= eps
            fd = (relaxed(*args_p) - relaxed(*args_m)) / (2 * eps)
            num.view(*q.shape, -1)[..., idx] = fd
        torch.testing.assert_close(j_auto, num, atol=1e-7, rtol=1e-6)


def test_block_distillation_loss_by_hand():
    """b = 2, N = 6: the sampled query sees the complete blocks before its own."""
    q, k, _ = _qkv(b=1, h=1, n=6, d=3, seed=4)
    g = k.unflatten(2, (3, 2)).mean(3)
    gen = torch.Generator().manual_seed(0)
    i = int(2 + torch.randint(4, (1, 1), generator=torch.Generator().manual_seed(0)))
    beta = i // 2
    p = torch.softmax(q[0, 0, i] @ k[0, 0, : 2 * beta].T * 3**-0.5, -1)
    target = torch.stack([p[2 * j : 2 * j + 2].sum() for j in range(beta)])
    logpi = torch.log_softmax(0.5 * q[0, 0, i] @ g[0, 0, :beta].T, -1)
    want = (target * (target.log() - logpi)).sum()
    got, rows = block_distillation_loss(
        q, k, g, block_size=2, scale=3**-0.5, gate_scale=0.5, queries=1, generator=gen
    )
    assert rows.tolist() == [[i]]
    torch.testing.assert_close(got[0, 0, 0], want)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"router": "grouped"}, "router must be one of"),
        ({"distill_queries": 0}, "distill_queries"),
        ({"distill_weight": float("inf")}, "distill_weight must be a finite number"),
    ],
)
def test_bad_moba_router_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        MoBACausal(**kw)
