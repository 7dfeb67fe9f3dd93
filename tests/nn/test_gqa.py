"""Grouped-query attention: a GQA module equals the full-head module whose k/v heads are repeated."""

from __future__ import annotations

import pytest
import torch

from mita.nn import ATTENTION_KINDS, build_attention

EXTRA = {
    "mita": dict(num_landmarks=4, topk=5),
    "agent": dict(num_landmarks=4),
    "topk": dict(topk=5),
    "moba": dict(block_size=4, top_blocks=2),
}


def _expand_heads(w: torch.Tensor, heads: int, kv_heads: int, d: int) -> torch.Tensor:
    """Rows (or channels) of kv heads [Hkv * d, ...] -> [H * d, ...], head h reading kv head h // g."""
    return (
        w.reshape(kv_heads, d, *w.shape[1:])
        .repeat_interleave(heads // kv_heads, dim=0)
        .reshape(-1, *w.shape[1:])
    )


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("variant", [{}, dict(dwc=True, gate=True, qk_norm=True)])
def test_gqa_equals_repeated_kv_heads(kind, variant):
    torch.manual_seed(0)
    dim, h, hkv = 32, 4, 2
    d = dim // h
    kw = dict(qkv_bias=True, layout="seq", prefix_tokens=0, **variant, **EXTRA.get(kind, {}))
    gqa = build_attention(kind, dim, h, num_kv_heads=hkv, **kw).double()
    full = build_attention(kind, dim, h, **kw).double()
    assert gqa.qkv.weight.shape[0] == dim + 2 * hkv * d + (dim if variant else 0)
    sd = gqa.state_dict()
    new = dict(sd)
    for name in ("qkv.weight", "qkv.bias"):
        q, k, v, *g = sd[name].split([dim, hkv * d, hkv * d] + ([dim] if variant else []))
        new[name] = torch.cat([q, _expand_heads(k, h, hkv, d), _expand_heads(v, h, hkv, d), *g])
    if variant:
        new["dwc.weight"] = _expand_heads(sd["dwc.weight"], h, hkv, d)
        new["dwc.bias"] = _expand_heads(sd["dwc.bias"], h, hkv, d)
    full.load_state_dict(new)
    x = torch.randn(2, 20, dim, dtype=torch.float64)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, 14:] = True
    torch.testing.assert_close(
        gqa(x, key_padding_mask=mask), full(x, key_padding_mask=mask), rtol=1e-10, atol=1e-10
    )


def test_bad_kv_heads():
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        build_attention("mita", 32, 4, num_kv_heads=3)
