"""SPEC §2.2 variants (DWC, gate, RoPE) and timm's qk_norm / scale_norm, against a dense re-statement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mita.nn import build_attention
from mita.nn.rope import apply_rope, grid_positions, rope_angles

from .dense import merge, mita_head, pool_grid, pool_seq, softmax_attention, split


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Complex-number RoPE: pairs (2j, 2j+1) times exp(i * angle_j); x [L, d], angles [L, d/2]."""
    z = torch.view_as_complex(x.reshape(x.shape[0], -1, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).reshape(x.shape)


def grid_angles(h: int, w: int, d: int, theta: float) -> torch.Tensor:
    f = theta ** (-torch.arange(0, d // 2, 2, dtype=torch.float64) / (d // 2))
    rows = torch.arange(h * w, dtype=torch.float64) // w
    cols = torch.arange(h * w, dtype=torch.float64) % w
    return torch.cat((rows[:, None] * f, cols[:, None] * f), dim=1)


def seq_angles(length: int, d: int, theta: float) -> torch.Tensor:
    f = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.arange(length, dtype=torch.float64)[:, None] * f


def _dense_shell(mod, x, grid, prefix, head_fn):
    """qkv(g) -> qk_norm -> RoPE on the body tokens -> attention -> + DWC(V) -> norm -> * SiLU(g) -> proj.

    ``grid=None`` means the 1-D layout: every token after the prefix is the body.
    """
    body = x.shape[1] - prefix if grid is None else grid[0] * grid[1]
    end = prefix + body
    parts = 4 if mod.use_gate else 3
    out = []
    for b in range(x.shape[0]):
        q, k, v, *g = split(x[b], mod.qkv.weight, mod.qkv.bias, mod.num_heads, parts)
        if isinstance(mod.q_norm, torch.nn.LayerNorm):
            q = F.layer_norm(q, q.shape[-1:], mod.q_norm.weight, mod.q_norm.bias, mod.q_norm.eps)
            k = F.layer_norm(k, k.shape[-1:], mod.k_norm.weight, mod.k_norm.bias, mod.k_norm.eps)
        if mod.rope_theta is not None:
            if grid is None:
                ang = seq_angles(body, mod.head_dim, mod.rope_theta)
            else:
                ang = grid_angles(*grid, mod.head_dim, mod.rope_theta)
            q, k = q.clone(), k.clone()
            for hh in range(mod.num_heads):
                q[hh, prefix:end] = rotate(q[hh, prefix:end], ang)
                k[hh, prefix:end] = rotate(k[hh, prefix:end], ang)
        o = merge(torch.stack([head_fn(q[i], k[i], v[i]) for i in range(mod.num_heads)]))
        if mod.dwc is not None:
            vb = merge(v)[prefix:end].T.unsqueeze(0)  # [1, C, body]
            if grid is None:
                conv = F.conv1d(vb, mod.dwc.weight, mod.dwc.bias, padding=1, groups=mod.dim)
            else:
                conv = F.conv2d(
                    vb.reshape(1, -1, *grid), mod.dwc.weight, mod.dwc.bias, padding=1, groups=mod.dim
                )
            conv = conv[0].reshape(mod.dim, -1).T
            zeros = o.new_zeros
            o = o + torch.cat((zeros(prefix, mod.dim), conv, zeros(o.shape[0] - end, mod.dim)))
        if isinstance(mod.norm, torch.nn.LayerNorm):
            o = F.layer_norm(o, (mod.dim,), mod.norm.weight, mod.norm.bias, mod.norm.eps)
        if g:
            o = o * F.silu(merge(g[0]))
        out.append(o @ mod.proj.weight.T + mod.proj.bias)
    return torch.stack(out)


VARIANTS = [
    dict(dwc=True),
    dict(gate=True),
    dict(rope=True),
    dict(rope=100.0, qk_norm=True),
    dict(dwc=True, gate=True, rope=True, qk_norm=True, scale_norm=True),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["full", "mita"])
def test_variants_match_dense_shell(kind, variant):
    torch.manual_seed(0)
    extra = dict(num_landmarks=4, topk=5) if kind == "mita" else {}
    # 1 cls + 4x4 grid + 1 trailing register
    mod = build_attention(
        kind, 32, 2, qkv_bias=True, grid=(4, 4), prefix_tokens=1, **variant, **extra
    ).double()
    for p in mod.parameters():  # make norms non-trivial
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 18, 32, dtype=torch.float64)
    if kind == "full":
        head_fn = softmax_attention
    else:
        head_fn = lambda q, k, v: mita_head(q, k, v, pool_grid(q[1:17], (4, 4), (2, 2)), 5)  # noqa: E731
    torch.testing.assert_close(mod(x), _dense_shell(mod, x, (4, 4), 1, head_fn), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["full", "mita"])
def test_variants_in_seq_layout_match_dense_shell(kind):
    torch.manual_seed(3)
    variant = dict(dwc=True, gate=True, rope=30.0, qk_norm=True)
    extra = dict(num_landmarks=3, topk=4) if kind == "mita" else {}
    mod = build_attention(kind, 16, 2, qkv_bias=True, layout="seq", prefix_tokens=2, **variant, **extra)
    mod = mod.double()
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    if kind == "full":
        head_fn = softmax_attention
    else:
        head_fn = lambda q, k, v: mita_head(q, k, v, pool_seq(q[2:], 3), 4)  # noqa: E731
    torch.testing.assert_close(mod(x), _dense_shell(mod, x, None, 2, head_fn), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["grid", "seq"])
@pytest.mark.parametrize("kind", ["full", "mita", "agent", "linear"])
def test_variant_parameters_all_get_gradients(kind, layout):
    torch.manual_seed(4)
    extra = {"mita": dict(num_landmarks=4, topk=4), "agent": dict(num_landmarks=4)}.get(kind, {})
    mod = build_attention(
        kind, 32, 4, qkv_bias=True, layout=layout, dwc=True, gate=True, rope=True, qk_norm=True,
        scale_norm=True, **extra,
    )  # fmt: skip
    x = torch.randn(2, 17, 32, requires_grad=True)
    mod(x).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_gate_widens_qkv_and_dwc_is_depthwise():
    mod = build_attention("mita", 32, 2, gate=True, dwc=True, num_landmarks=4, topk=3)
    assert mod.qkv.weight.shape == (128, 32)
    assert mod.dwc.weight.shape == (32, 1, 3, 3)
    seq = build_attention("full", 32, 2, dwc=True, layout="seq", prefix_tokens=0)
    assert seq.dwc.weight.shape == (32, 1, 3)


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(1)
    q, k = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)

    def dot(pq, pk):
        aq = rope_angles(torch.tensor([pq]), 16)
        ak = rope_angles(torch.tensor([pk]), 16)
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum()

    torch.testing.assert_close(dot((2, 3), (5, 1)), dot((7, 8), (10, 6)))
    assert not torch.allclose(dot((2, 3), (5, 1)), dot((2, 3), (5, 2)))
    torch.testing.assert_close(dot((0, 0), (0, 0)), (q * k).sum())


def test_rope_matches_complex_rotation_and_keeps_prefix():
    torch.manual_seed(2)
    x = torch.randn(2, 1 + 12, 8, dtype=torch.float64)
    ang = rope_angles(grid_positions(3, 4), 8, theta=50.0)
    y = apply_rope(x, ang, start=1)
    torch.testing.assert_close(y[:, 0], x[:, 0])
    for b in range(2):
        torch.testing.assert_close(y[b, 1:], rotate(x[b, 1:], grid_angles(3, 4, 8, 50.0)))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles(grid_positions(3, 4), 6)
