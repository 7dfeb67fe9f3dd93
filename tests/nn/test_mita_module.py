"""MiTAAttention against the dense SPEC §2 formula, the published forward, and its validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mita.convert import convert
from mita.nn import MiTAAttention, build_attention

from .dense import merge, mita_head, pool_grid, pool_seq, split

torch.set_default_dtype(torch.float32)


def _dense_module(mod: MiTAAttention, x, landmarks_of, pad=None, s=1, dedup=False):
    """Dense forward of a plain MiTAAttention (no variants) given a per-head landmark function."""
    out = []
    for b in range(x.shape[0]):
        q, k, v = split(x[b], mod.qkv.weight, mod.qkv.bias, mod.num_heads)
        p = None if pad is None else pad[b]
        heads = [
            mita_head(q[h], k[h], v[h], landmarks_of(q[h], p), mod.topk, s=s, pad=p, dedup=dedup)
            for h in range(len(q))
        ]
        out.append(merge(torch.stack(heads)) @ mod.proj.weight.T + mod.proj.bias)
    return torch.stack(out)


@pytest.mark.parametrize("s,dedup", [(1, False), (2, False), (3, True)])
def test_grid_layout_matches_dense_formula(s, dedup):
    torch.manual_seed(0)
    # 1 cls + 6x6 patches + 2 trailing registers; landmarks pool the 6x6 grid to 2x3.
    mod = MiTAAttention(
        24, 3, qkv_bias=True, num_landmarks=(2, 3), topk=5, experts_per_query=s, dedup=dedup, grid=(6, 6)
    ).double()
    x = torch.randn(2, 39, 24, dtype=torch.float64)
    got = mod(x)
    want = _dense_module(mod, x, lambda q, p: pool_grid(q[1:37], (6, 6), (2, 3)), s=s, dedup=dedup)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_seq_layout_with_padding_matches_dense_formula():
    torch.manual_seed(1)
    mod = MiTAAttention(16, 2, layout="seq", prefix_tokens=0, num_landmarks=4, topk=6).double()
    x = torch.randn(3, 30, 16, dtype=torch.float64)
    pad = torch.rand(3, 30) < 0.3  # scattered padding: landmarks pool the real tokens only
    got = mod(x, key_padding_mask=pad)
    want = _dense_module(mod, x, lambda q, p: pool_seq(q[~p], 4), pad=pad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_padded_sequence_equals_unpadded_one():
    torch.manual_seed(2)
    mod = MiTAAttention(16, 2, layout="seq", prefix_tokens=0, num_landmarks=4, topk=5).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    padded = torch.cat((x, torch.randn(1, 9, 16, dtype=torch.float64)), dim=1)
    pad = torch.zeros(1, 29, dtype=torch.bool)
    pad[:, 20:] = True
    torch.testing.assert_close(mod(padded, key_padding_mask=pad)[:, :20], mod(x), rtol=1e-10, atol=1e-10)


def _published_forward(mod: MiTAAttention, x: torch.Tensor, pool: int) -> torch.Tensor:
    """The authors' DeiT ``MiTA_Attention.forward`` restated (dense joint softmax instead of flash-attn)."""
    b, n, c = x.shape
    h = mod.num_heads
    d = c // h
    scale = d**-0.5
    qkv = F.linear(x, mod.qkv.weight, mod.qkv.bias).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    side = int(n**0.5)
    # "include the cls token, ditch the last token"
    router = F.adaptive_avg_pool2d(q[:, :-1, :].reshape(b, side, side, c).permute(0, 3, 1, 2), (pool, pool))
    router = router.reshape(b, c, -1).permute(0, 2, 1)
    heads = lambda t: t.reshape(b, t.shape[1], h, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v, router = heads(q), heads(k), heads(v), heads(router)
    idx = (router @ k.transpose(-1, -2)).topk(mod.topk, dim=-1, sorted=False).indices  # [b, h, M, k]
    agent_value = F.scaled_dot_product_attention(router, k, v)
    expert = (router @ q.transpose(-1, -2)).argmax(dim=-2)  # [b, h, N]
    out = torch.empty_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                sel = idx[bi, hi, expert[bi, hi, i]]
                keys = torch.cat((router[bi, hi] * scale, k[bi, hi, sel]))  # shared keys are router * scale
                vals = torch.cat((agent_value[bi, hi], v[bi, hi, sel]))
                w = torch.softmax(q[bi, hi, i] @ keys.T * scale, dim=0)
                out[bi, hi, i] = w @ vals
    return F.linear(out.transpose(1, 2).reshape(b, n, c), mod.proj.weight, mod.proj.bias)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_official_landmarks_reproduce_published_forward(dtype, tol):
    torch.manual_seed(3)
    mod = MiTAAttention(32, 4, qkv_bias=True, landmark_mode="official", num_landmarks=9, topk=7).to(dtype)
    x = torch.randn(2, 50, 32, dtype=dtype)  # cls + 7x7 patches
    torch.testing.assert_close(mod(x), _published_forward(mod, x, 3), rtol=tol, atol=tol)


def test_state_dict_names_are_timms():
    mod = MiTAAttention(32, 4, qkv_bias=True, qk_norm=True)
    assert set(mod.state_dict()) == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
        "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias",
    }  # fmt: skip
    assert mod.qkv.weight.shape == (96, 32) and mod.q_norm.weight.shape == (8,)


def test_record_routing_keeps_detached_routing_and_layout():
    mod = MiTAAttention(16, 2, num_landmarks=4, topk=3)
    x = torch.randn(2, 17, 16, requires_grad=True)
    mod(x)
    assert mod.last_routing is None
    mod.record_routing = True
    mod(x).sum().backward()
    r = mod.last_routing
    assert r.expert_index.shape == (2, 2, 17, 1) and r.key_index.shape == (2, 2, 4, 3)
    assert not r.expert_index.requires_grad
    assert mod.last_layout == {"layout": "grid", "grid": (4, 4), "prefix_tokens": 1, "num_landmarks": 4}


@pytest.mark.parametrize("mode", ["pool", "official", "random", "learned", "conv"])
def test_every_landmark_mode_trains(mode):
    torch.manual_seed(4)
    mod = MiTAAttention(32, 4, qkv_bias=True, landmark_mode=mode, num_landmarks=9, topk=6, grid=(7, 7))
    x = torch.randn(2, 50, 32, requires_grad=True)
    out = mod(x)
    assert out.shape == (2, 50, 32) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_random_landmarks_are_query_tokens_fixed_in_eval():
    torch.manual_seed(5)
    mod = MiTAAttention(16, 2, landmark_mode="random", layout="seq", prefix_tokens=2, num_landmarks=5, topk=4)
    q = torch.randn(3, 2, 40, 8)
    tl = mod.layout_of(40)
    mod.eval()
    a, b = mod.landmark(q, tl, None), mod.landmark(q, tl, None)
    torch.testing.assert_close(a, b)
    body = q[:, :, 2:]
    # every landmark is one of the body queries (prefix tokens are never drawn)
    hit = (a.unsqueeze(3) == body.unsqueeze(2)).all(-1).any(-1)
    assert hit.all()
    mod.train()
    draws = {tuple(mod.landmark(q, tl, None)[0, 0, :, 0].tolist()) for _ in range(5)}
    assert len(draws) > 1


def test_conv_landmarks_on_sequence():
    mod = MiTAAttention(
        16, 2, landmark_mode="conv", layout="seq", prefix_tokens=0, num_landmarks=4, topk=4, conv_kernel=5
    )
    x = torch.randn(2, 40, 16)
    assert mod(x).shape == (2, 40, 16)


@pytest.mark.parametrize(
    "kwargs,n,match",
    [
        (dict(dim=30, num_heads=4), 17, "not divisible"),
        (dict(dim=16, num_heads=2, num_landmarks=10), 17, "square"),
        (dict(dim=16, num_heads=2, grid=(5, 5)), 17, "does not fit"),
        (dict(dim=16, num_heads=2, num_landmarks=4, topk=40), 17, "topk=40 exceeds"),
        (dict(dim=16, num_heads=2, num_landmarks=36, topk=2), 17, "36"),
        (
            dict(dim=16, num_heads=2, layout="seq", prefix_tokens=0, num_landmarks=30, topk=2),
            17,
            "num_landmarks=30",
        ),
        (dict(dim=16, num_heads=2, attn_drop=0.1), 17, "attn_drop"),
        (dict(dim=16, num_heads=2, shared=False, routed=False), 17, "no expert"),
        (dict(dim=16, num_heads=2, landmark_mode="bogus"), 17, "landmark_mode must be"),
        (dict(dim=16, num_heads=2, landmark_mode="conv"), 17, "conv"),
        (dict(dim=16, num_heads=2, layout="cube"), 17, "layout"),
        (dict(dim=16, num_heads=2), 18, "not a square"),
        (dict(dim=12, num_heads=2, rope=True), 17, "rope"),
    ],
)
def test_bad_configuration_raises_value_error(kwargs, n, match):
    with pytest.raises(ValueError, match=match):
        mod = MiTAAttention(**kwargs)
        mod(torch.randn(1, n, kwargs["dim"]))


def test_bad_mask_raises_value_error():
    mod = MiTAAttention(16, 2, num_landmarks=4, topk=3)
    with pytest.raises(ValueError, match=r"\[B, N\] = \[2, 17\]"):
        mod(torch.randn(2, 17, 16), key_padding_mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        mod(torch.randn(2, 17, 16), key_padding_mask=torch.zeros(2, 17))


def test_landmark_scale_defaults_to_one_over_d():
    torch.manual_seed(6)
    a = MiTAAttention(16, 2, num_landmarks=4, topk=3).double()
    b = MiTAAttention(16, 2, num_landmarks=4, topk=3, landmark_scale=1 / 8).double()
    c = MiTAAttention(16, 2, num_landmarks=4, topk=3, landmark_scale=math.sqrt(1 / 8)).double()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    x = torch.randn(1, 17, 16, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(experts_per_query=1.5), r"experts_per_query must be an int in 1..m=4, got 1.5"),
        (dict(experts_per_query=5), r"experts_per_query must be an int in 1..m=4, got 5"),
        (dict(backend="bogus"), r"backend must be one of .*got 'bogus'"),
        (dict(landmark_scale=-1), r"landmark_scale must be a positive number .*got -1"),
        (dict(landmark_scale=float("inf")), r"landmark_scale must be a positive number \(finite\)"),
        (dict(shared="no"), r"shared must be True or False, got 'no'"),
        (dict(dedup=1), r"dedup must be True or False"),
        (dict(topk=np.int64(0)), r"topk must be an int >= 1, got 0"),
        (dict(topk=2.0), r"topk must be an int"),
    ],
)
def test_constructor_rejects_bad_options_before_any_forward(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MiTAAttention(16, 2, **{"num_landmarks": 4, "topk": 3, **kwargs})


def test_numpy_integer_options_are_accepted():
    torch.manual_seed(0)
    a = MiTAAttention(16, 2, num_landmarks=4, topk=3, experts_per_query=2).double()
    b = MiTAAttention(16, 2, num_landmarks=4, topk=np.int64(3), experts_per_query=np.int32(2)).double()
    b.load_state_dict(a.state_dict())
    assert type(b.topk) is int and type(b.experts_per_query) is int
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mita", "agent"])
def test_landmarks_keyword_is_a_deprecated_alias_of_landmark_mode(kind):
    kw = dict(num_landmarks=4, topk=3) if kind == "mita" else dict(num_landmarks=4)
    torch.manual_seed(0)
    new = build_attention(kind, 16, 2, landmark_mode="learned", **kw)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"landmarks=\.\.\.\) is deprecated.*use landmark_mode="):
        old = build_attention(kind, 16, 2, landmarks="learned", **kw)
    assert old.landmark_mode == new.landmark_mode == "learned" and old.config == new.config
    assert "landmarks" not in old.config
    x = torch.randn(2, 17, 16)
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored config uses the new name: converting does not warn
        assert convert(old, kind).landmark_mode == "learned"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        build_attention(kind, 16, 2, landmarks="learned", landmark_mode="conv", **kw)
