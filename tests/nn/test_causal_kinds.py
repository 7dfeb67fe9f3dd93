"""Causal mixers (mita.nn.causal): exact causality, decoding caches, known answers, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mita import mita_causal_attention
from mita.landmarks import block_mean
from mita.nn import MiTAAttention, build_attention
from mita.nn.causal import CAUSAL_KINDS, MiTACausal, build_causal_mixer, filter_causal_kwargs

KINDS_OPTS = {
    "full": {},
    "window": {"block_size": 4},
    "moba": {"block_size": 4, "top_blocks": 2},
    "moba-gate": {"block_size": 4, "top_blocks": 2, "router": "gate"},
    "moba-distilled": {"block_size": 4, "top_blocks": 1, "router": "gate+distill", "distill_queries": 8},
    "mita": {"block_size": 4, "topk": 3, "landmark_horizon": "prefix"},
    "mita-frozen": {"block_size": 4, "topk": 3, "landmark_horizon": "frozen"},
    "mita-routed": {"block_size": 4, "topk": 3, "landmark_horizon": "frozen", "shared": False},
    "mita-gate": {"block_size": 4, "topk": 3, "landmark_horizon": "prefix", "router": "gate"},
    "mita-s2": {"block_size": 4, "topk": 3, "landmark_horizon": "frozen", "experts_per_query": 2},
}


def _mixer(name: str):
    return build_causal_mixer(name.split("-")[0], **KINDS_OPTS[name])


def _qkv(b=2, h=2, n=19, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_registry_names():
    assert CAUSAL_KINDS == ("full", "mita", "moba", "window")


@pytest.mark.parametrize("name", list(KINDS_OPTS))
@pytest.mark.parametrize("which", [0, 1, 2])
def test_perturbing_the_future_leaves_the_past_bitwise_unchanged(name, which):
    mixer = _mixer(name)
    qkv = _qkv()
    ref = mixer(*qkv)
    for p in (0, 3, 4, 5, 11, 18):  # block starts, ends and middles of N = 19, b = 4
        pert = [t.clone() for t in qkv]
        pert[which][:, :, p:] += torch.randn_like(pert[which][:, :, p:]) * 3
        out = mixer(*pert)
        assert torch.equal(out[:, :, :p], ref[:, :, :p]), (name, which, p)
        if which != 1 or p > 0:  # (a new key at 0 with one key visible changes nothing at 0)
            assert not torch.equal(out[:, :, p:], ref[:, :, p:])


@pytest.mark.parametrize("name", list(KINDS_OPTS))
def test_no_gradient_from_future_inputs(name):
    mixer = _mixer(name)
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=1, n=13))
    out = mixer(q, k, v)
    for i in (0, 3, 4, 8, 12):
        grads = torch.autograd.grad(out[0, 0, i].sum(), (q, k, v), retain_graph=True)
        for g in grads:
            assert torch.count_nonzero(g[0, 0, i + 1 :]) == 0, (name, i)


@pytest.mark.parametrize("name", list(KINDS_OPTS))
@pytest.mark.parametrize("chunks", [[1] * 19, [5, 1, 3, 4, 6], [19]])
def test_cache_equals_parallel(name, chunks):
    mixer = _mixer(name)
    q, k, v = _qkv()
    ref = mixer(q, k, v)
    cache = mixer.new_cache()
    outs, s = [], 0
    for c in chunks:
        outs.append(cache.append(q[:, :, s : s + c], k[:, :, s : s + c], v[:, :, s : s + c]))
        s += c
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=0, atol=1e-12)


def _dense_reference(q, k, v, allowed):
    """softmax over the allowed keys, one query at a time (the definition)."""
    out = torch.zeros_like(q)
    n = q.shape[2]
    for i in range(n):
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                keys = [t for t in range(n) if allowed(b, h, i, t)]
                w = (q[b, h, i] @ k[b, h, keys].T / q.shape[-1] ** 0.5).softmax(-1)
                out[b, h, i] = w @ v[b, h, keys]
    return out


def test_window_matches_its_definition():
    q, k, v = _qkv(n=14)
    bs = 4
    out = build_causal_mixer("window", block_size=bs)(q, k, v)
    ref = _dense_reference(q, k, v, lambda b, h, i, t: (i // bs - 1) * bs <= t <= i)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_moba_matches_its_definition():
    q, k, v = _qkv(n=17)
    bs, s = 4, 2
    out = build_causal_mixer("moba", block_size=bs, top_blocks=s)(q, k, v)
    means = k[:, :, :16].reshape(2, 2, 4, bs, -1).mean(3)

    def allowed(b, h, i, t):
        if t > i:
            return False
        if t // bs == i // bs:
            return True
        past = list(range(i // bs))
        scores = {j: float(q[b, h, i] @ means[b, h, j]) for j in past}
        chosen = sorted(past, key=lambda j: -scores[j])[:s]
        return t // bs in chosen

    torch.testing.assert_close(out, _dense_reference(q, k, v, allowed), rtol=0, atol=1e-12)


def test_moba_never_selects_a_future_block_even_when_it_scores_highest():
    q, k, v = _qkv(b=1, h=1, n=12)
    bs = 4
    mixer = build_causal_mixer("moba", block_size=bs, top_blocks=1)
    k2 = k.clone()
    k2[:, :, 8:] = q[:, :, 4:8].mean(2, keepdim=True) * 50  # block 2 would win every gate of block 1
    out, out2 = mixer(q, k, v), mixer(q, k2, v)
    assert torch.equal(out[:, :, :8], out2[:, :, :8])
    chosen = mixer.select(torch.arange(12), q, k2)  # [1, 1, 12, 3]
    assert not chosen[0, 0, :8, 2].any() and not chosen[0, 0, :4].any()
    assert chosen[0, 0, 4:8, 0].all()  # block 1's queries have only block 0 to choose


@pytest.mark.parametrize(
    "kind, opts",
    [
        ("window", {"block_size": 32}),
        ("moba", {"block_size": 4, "top_blocks": 5}),
        # SPEC §5.6, prefix horizon only: its routed expert holds every key before the query's block
        ("mita", {"block_size": 4, "topk": 19, "landmark_horizon": "prefix", "shared": False}),
    ],
)
def test_wide_enough_budgets_are_exactly_causal_attention(kind, opts):
    q, k, v = _qkv(n=19)
    out = build_causal_mixer(kind, **opts)(q, k, v)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize(
    "kind, kw, match",
    [
        ("dense", {}, "unknown causal attention kind 'dense'"),
        ("window", {"block_size": 0}, "block_size must be a positive int"),
        ("moba", {"top_blocks": 1.5}, "top_blocks must be a positive int"),
        ("mita", {"landmark_horizon": "future"}, "landmark_horizon must be 'prefix' or 'frozen'"),
        ("mita", {"topk": 0}, "topk must be a positive int"),
        ("mita", {"shared": "no"}, "shared must be True or False, got 'no'"),
        ("full", {"num_landmarks": 4}, r"causal attention kind 'full' does not take \['num_landmarks'\]"),
        ("window", {"block_size": 4, "topk": 3}, r"causal attention kind 'window' does not take \['topk'\]"),
        ("mita", {"experts_per_query": 0}, "experts_per_query"),
        ("mita", {"router": "grouped", "landmark_horizon": "frozen", "experts_per_query": 2}, "grouped"),
    ],
)
def test_bad_options_raise(kind, kw, match):
    with pytest.raises(ValueError, match=match):
        build_causal_mixer(kind, **kw)


def test_one_set_of_settings_is_carried_across_kinds_by_filtering_it():
    settings = {"block_size": 4, "topk": 3, "top_blocks": 2, "landmark_horizon": "frozen"}
    assert filter_causal_kwargs("window", settings) == {"block_size": 4}
    assert filter_causal_kwargs("moba", settings) == {"block_size": 4, "top_blocks": 2}
    assert build_causal_mixer("mita", **filter_causal_kwargs("mita", settings)).topk == 3
    with pytest.raises(ValueError, match=r"unknown causal attention options \['num_landmarks'\]"):
        filter_causal_kwargs("full", {"num_landmarks": 4})


def test_bad_shapes_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q, k, v must be \[B, H, N, d\]"):
        build_causal_mixer("window", block_size=4)(q, k[:, :, :5], v)


def test_mita_causal_is_the_causal_op_with_block_mean_landmarks():
    torch.manual_seed(0)
    for s_ in (1, 2):
        mod = MiTACausal(block_size=4, topk=3, experts_per_query=s_).eval()
        q, k, v = _qkv(n=13)
        out = mod(q, k, v)
        q2 = q.clone()
        q2[:, :, 6:] += 1.0
        out2 = mod(q2, k, v)
        assert torch.equal(out2[:, :, :6], out[:, :, :6]) and not torch.equal(out2[:, :, 6], out[:, :, 6])
        mix = mita_causal_attention(
            q, k, v, block_mean(q, 4), topk=3, block_size=4, landmark_horizon="prefix", experts_per_query=s_
        )
        torch.testing.assert_close(out, mix, rtol=0, atol=1e-12)
        mod.record_routing = True
        mod(q, k, v)
        assert mod.last_routing.horizon == "prefix" and mod.last_routing.expert_index.shape == (2, 2, 13, s_)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"landmark_horizon": "all"}, "landmark_horizon must be 'prefix' or 'frozen'"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_mita_causal_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        MiTACausal(**{"topk": 3, **kw})


def test_the_attention_modules_are_non_causal():
    with pytest.raises(ValueError, match="is non-causal"):
        MiTAAttention(16, 2, layout="seq", prefix_tokens=0, topk=3)(torch.randn(1, 8, 16), is_causal=True)
    with pytest.raises(TypeError, match="causal"):  # causal MiTA is MiTACausal
        MiTAAttention(16, 2, layout="seq", prefix_tokens=0, topk=3, causal=True)
    with pytest.raises(ValueError, match=r"does not take \['block_size', 'causal'\]"):
        build_attention("mita", 16, 2, layout="seq", prefix_tokens=0, causal=True, block_size=4)
