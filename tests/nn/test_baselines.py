"""Every baseline against its own dense formula (float64), with padding, seq and grid layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mita.nn import ATTENTION_KINDS, build_attention

from .dense import merge, pool_grid, pool_seq, softmax_attention, split


def agent_head(q, k, v, agents, pad):
    c = q.shape[1] ** -0.5
    logits = agents @ k.T * c
    logits[:, pad] = -math.inf
    agent_v = torch.softmax(logits, 1) @ v
    return torch.softmax(q @ agents.T * c, 1) @ agent_v


def moba_head(q, k, v, block, top, pad):
    n, d = q.shape
    blocks = [list(range(a, min(a + block, n))) for a in range(0, n, block)]
    means = []
    for idx in blocks:
        real = [i for i in idx if not pad[i]]
        means.append(k[real].mean(0) if real else torch.full((d,), math.nan, dtype=k.dtype))
    out = torch.empty_like(q)
    for i in range(n):
        scores = torch.stack(
            [q[i] @ mk if not torch.isnan(mk).any() else torch.tensor(-math.inf) for mk in means]
        )
        chosen = [j for b in scores.topk(top).indices.tolist() for j in blocks[b] if not pad[j]]
        w = torch.softmax(q[i] @ k[chosen].T / math.sqrt(d), 0)
        out[i] = w @ v[chosen]
    return out


def topk_head(q, k, v, topk, pad):
    logits = q @ k.T / math.sqrt(q.shape[1])
    logits[:, pad] = -math.inf
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        idx = logits[i].topk(topk).indices
        out[i] = torch.softmax(logits[i, idx], 0) @ v[idx]
    return out


def linear_head(q, k, v, pad):
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    fk, v = fk[~pad], v[~pad]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        w = fk @ fq[i]  # phi(q_i) . phi(k_j)
        out[i] = (w @ v) / w.sum()
    return out


def _dense(mod, x, pad, head_fn):
    out = []
    for b in range(x.shape[0]):
        q, k, v = split(x[b], mod.qkv.weight, mod.qkv.bias, mod.num_heads)
        heads = torch.stack([head_fn(q[h], k[h], v[h], pad[b]) for h in range(len(q))])
        out.append(merge(heads) @ mod.proj.weight.T + mod.proj.bias)
    return torch.stack(out)


SEQ = dict(layout="seq", prefix_tokens=0)


@pytest.mark.parametrize(
    "kind,kw,head_fn",
    [
        ("full", SEQ, lambda q, k, v, p: softmax_attention(q, k, v, p)),
        ("agent", {**SEQ, "num_landmarks": 5}, lambda q, k, v, p: agent_head(q, k, v, pool_seq(q[~p], 5), p)),
        ("moba", {**SEQ, "block_size": 4, "top_blocks": 2}, lambda q, k, v, p: moba_head(q, k, v, 4, 2, p)),
        ("moba", {**SEQ, "block_size": 5, "top_blocks": 3, "chunk_size": 7},
         lambda q, k, v, p: moba_head(q, k, v, 5, 3, p)),
        ("topk", {**SEQ, "topk": 6, "chunk_size": 7}, lambda q, k, v, p: topk_head(q, k, v, 6, p)),
        ("linear", SEQ, lambda q, k, v, p: linear_head(q, k, v, p)),
    ],
)  # fmt: skip
def test_seq_baselines_match_dense_formula_with_padding(kind, kw, head_fn):
    torch.manual_seed(0)
    mod = build_attention(kind, 16, 2, qkv_bias=True, **kw).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    pad = torch.zeros(2, 23, dtype=torch.bool)
    pad[1, 15:] = True  # right padding
    pad[0, [3, 9]] = True  # and scattered padding
    torch.testing.assert_close(
        mod(x, key_padding_mask=pad), _dense(mod, x, pad, head_fn), rtol=1e-10, atol=1e-10
    )


def test_agent_on_grid_pools_patches_only():
    torch.manual_seed(1)
    mod = build_attention("agent", 16, 2, num_landmarks=4, grid=(4, 4), prefix_tokens=1).double()
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    nopad = torch.zeros(2, 17, dtype=torch.bool)
    want = _dense(mod, x, nopad, lambda q, k, v, p: agent_head(q, k, v, pool_grid(q[1:], (4, 4), (2, 2)), p))
    torch.testing.assert_close(mod(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("layout", ["grid", "seq"])
def test_every_kind_trains_in_both_layouts(kind, layout):
    torch.manual_seed(2)
    extra = {
        "mita": dict(num_landmarks=4, topk=5),
        "agent": dict(num_landmarks=4),
        "topk": dict(topk=5),
        "moba": dict(block_size=4, top_blocks=2),
    }
    mod = build_attention(kind, 32, 4, qkv_bias=True, layout=layout, prefix_tokens=1, **extra.get(kind, {}))
    x = torch.randn(2, 26, 32, requires_grad=True)  # grid: cls + 5x5
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, 20:] = True
    out = mod(x, key_padding_mask=mask if layout == "seq" else None)
    assert out.shape == (2, 26, 32) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, (kind, name)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_registry_rejects_unknown_kind_and_keywords():
    with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
        build_attention("flash", 16, 2)
    with pytest.raises(ValueError, match=r"does not take \['topk'\]"):
        build_attention("full", 16, 2, topk=3)
    with pytest.raises(ValueError, match="top_blocks=5 exceeds the 3 blocks"):
        build_attention("moba", 16, 2, block_size=8, top_blocks=5)(torch.randn(1, 17, 16))
    with pytest.raises(ValueError, match="attn_drop"):
        build_attention("linear", 16, 2, attn_drop=0.1)
