"""Masks: ``key_padding_mask`` (True = padding) is mita's; ``attn_mask`` keeps timm's / SDPA's meaning."""

from __future__ import annotations

import pytest
import torch

import mita
from mita.nn import ATTENTION_KINDS, build_attention

_KW = {
    "mita": dict(num_landmarks=4, topk=5),
    "agent": dict(num_landmarks=4),
    "moba": dict(block_size=4),
    "topk": dict(topk=5),
}


def _module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(layout="seq", prefix_tokens=1, **_KW.get(kind, {}))
    return build_attention(kind, 16, 2, **kw).double().eval()


def _pad(b: int = 2, n: int = 13) -> torch.Tensor:
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[0, 9:] = True
    pad[1, 4:] = True
    return pad


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_key_only_attn_mask_is_key_padding(kind):
    mod, x, pad = _module(kind), torch.randn(2, 13, 16, dtype=torch.float64), _pad()
    expected = mod(x, key_padding_mask=pad)
    bool_mask = (~pad)[:, None, None, :]  # SDPA: True = attend
    additive = torch.zeros(2, 1, 1, 13, dtype=torch.float64).masked_fill(pad[:, None, None, :], float("-inf"))
    finfo_min = torch.zeros(2, 1, 1, 13).masked_fill(pad[:, None, None, :], torch.finfo(torch.float32).min)
    for mask in (bool_mask, additive, finfo_min):
        torch.testing.assert_close(mod(x, attn_mask=mask), expected, rtol=0, atol=0)
    # and the mask matters: without it the output differs
    assert not torch.allclose(mod(x), expected)


def test_attn_mask_broadcast_over_batch():
    mod, x = _module("mita"), torch.randn(3, 13, 16, dtype=torch.float64)
    pad = torch.zeros(3, 13, dtype=torch.bool)
    pad[:, 10:] = True
    torch.testing.assert_close(mod(x, attn_mask=~pad[:1, None, None]), mod(x, key_padding_mask=pad))


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.zeros(2, 13, dtype=torch.bool), r"key_padding_mask="),  # [B, N]: the other kwarg
        (torch.ones(2, 1, 13, 13, dtype=torch.bool), r"key-only .*\[2, 1, 1, 13\]"),  # per query
        (torch.ones(2, 2, 1, 13, dtype=torch.bool), r"key-only"),  # per head
        (torch.full((2, 1, 1, 13), 0.5), r"biases"),  # an additive bias is not padding
        (torch.zeros(2, 1, 1, 13, dtype=torch.long), r"bool or floating"),
        ([[True] * 13] * 2, r"tensor or None"),
    ],
)
def test_other_attn_masks_raise(mask, match):
    mod = _module("mita")
    with pytest.raises(ValueError, match=match):
        mod(torch.randn(2, 13, 16, dtype=torch.float64), attn_mask=mask)


def test_both_masks_raise():
    mod, pad = _module("full"), _pad()
    with pytest.raises(ValueError, match="not both"):
        mod(torch.randn(2, 13, 16, dtype=torch.float64), attn_mask=~pad[:, None, None], key_padding_mask=pad)


def test_timm_model_passing_attn_mask():
    """A timm ViT forwards its ``attn_mask`` to every block: converted to ``full`` it gives timm's output
    exactly, and converted to MiTA the key-only mask acts as key padding."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    arch = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **arch).eval()
    x = torch.randn(2, 3, 32, 32)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[0, 12:] = False
    keep = valid[:, None, None, :]
    with torch.no_grad():
        want = model(x, attn_mask=keep)
        full = mita.convert(model, "full")
        torch.testing.assert_close(full(x, attn_mask=keep), want, rtol=1e-5, atol=1e-5)
        m = mita.convert(full, "mita", num_landmarks=4, topk=4)
        got = m(x, attn_mask=keep)
        blocks = [blk.attn for blk in m.blocks]
        # the same forward by key_padding_mask, through the blocks by hand
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk, attn in zip(m.blocks, blocks):
            h = h + blk.ls1(attn(blk.norm1(h), key_padding_mask=~valid))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        torch.testing.assert_close(got, m.forward_head(m.norm(h)), rtol=1e-5, atol=1e-5)


def test_timm_naflexvit_key_only_mask_from_patch_valid():
    """timm's variable-resolution ViT builds a key-only additive mask ``[B, 1, 1, N]`` from ``patch_valid``:
    converted to ``full`` it matches timm, and converted to MiTA what the padded patches hold is ignored."""
    timm = pytest.importorskip("timm")
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg  # noqa: PLC0415 - optional

    cfg = NaFlexVitCfg(
        patch_size=4, embed_dim=32, depth=2, num_heads=2, use_key_only_attn_mask=True, global_pool="avg",
        pos_embed_grid_size=(4, 4),
    )  # fmt: skip
    torch.manual_seed(0)
    model = NaFlexVit(cfg, in_chans=3, num_classes=5).eval()
    b, n = 2, 12
    coord = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(1, n, 2)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 7:] = False
    patches = torch.randn(b, n, 4 * 4 * 3)
    junk = patches.masked_fill(~valid[..., None], 0.0) + 100 * torch.randn_like(patches) * ~valid[..., None]
    x = {"patches": patches, "patch_coord": coord.expand(b, -1, -1), "patch_valid": valid}
    x_junk = {**x, "patches": junk}
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(mita.convert(model, "full")(x), ref, rtol=1e-5, atol=1e-5)
        m = mita.convert(model, "mita", num_landmarks=3, topk=4)
        # no fixed patch grid: a sequence after the model's prefix tokens
        assert (m.blocks[0].attn.layout, m.blocks[0].attn.prefix_tokens) == ("seq", model.num_prefix_tokens)
        out = m(x)
        torch.testing.assert_close(m(x_junk), out, rtol=1e-5, atol=1e-5)
        unmasked = m({**x_junk, "patch_valid": torch.ones(b, n, dtype=torch.bool)})
        assert not torch.allclose(unmasked[1], out[1], atol=1e-3)
    assert timm is not None
