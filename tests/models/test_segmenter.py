"""mita.models.Segmenter: shapes with every attention kind, timm names, the decoder's suffix class tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mita import mita_attention
from mita.models import Segmenter, VisionTransformer, build_model
from mita.nn.registry import ATTENTION_KINDS

SMALL = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 5, "embed_dim": 32, "depth": 2}
LANDMARKS = {"mita": {"num_landmarks": 16, "topk": 8}, "agent": {"num_landmarks": 16}, "topk": {"topk": 8}}


@pytest.mark.parametrize("decoder", ["mask", "linear"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_forward_shapes_with_every_attention_kind(kind, decoder):
    torch.manual_seed(0)
    dec = {"decoder_attention": kind} if decoder == "mask" else {}
    model = build_model(
        "segmenter", attention=kind, decoder=decoder, **SMALL, **LANDMARKS.get(kind, {}), **dec
    )
    x = torch.randn(3, 1, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 5, 32, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    rebuilt = build_model(**model.config)  # model.config rebuilds it
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x.detach()), model.eval()(x.detach()))


def test_encoder_keeps_timm_names_and_decoder_kinds_default_sensibly():
    model = build_model("segmenter", attention="mita", decoder_attention="mita", **SMALL, **LANDMARKS["mita"])
    vit = VisionTransformer(32, 4, 1, 0, 32, 2, 2, 2.0, attention="mita", attn_kw=LANDMARKS["mita"])
    assert set(model.encoder.state_dict()) == set(vit.state_dict())
    assert {"encoder.cls_token", "encoder.pos_embed", "encoder.blocks.0.attn.qkv.weight"} <= set(
        model.state_dict()
    )
    dec_attn = model.decoder.blocks[0].attn
    assert (dec_attn.num_landmarks, dec_attn.topk) == (16, 8)  # the encoder's m and k carry over
    assert (dec_attn.prefix_tokens, dec_attn.grid) == (0, (8, 8))
    plain = build_model("segmenter", attention="mita", **SMALL, **LANDMARKS["mita"])
    assert type(plain.decoder.blocks[0].attn).__name__ == "FullAttention"  # default decoder: full
    with pytest.raises(ValueError, match="decoder must be one of"):
        Segmenter(decoder="fpn")


def test_decoder_class_tokens_are_suffix_tokens_never_pooled_into_landmarks():
    """The decoder's MiTA = an explicit construction: landmarks are the 2-D average pools of the *patch*
    queries only (the authors' decoder pools q[:, :-n_cls]); class tokens are queries, keys and values."""
    torch.manual_seed(1)
    n_cls, g, dim, heads = 5, 8, 32, 2
    dec_kw = {"num_landmarks": 16, "topk": 8}
    model = build_model(
        "segmenter", attention="full", decoder_attention="mita", decoder_attn_kw=dec_kw, **SMALL
    )
    attn = model.decoder.blocks[0].attn.double()
    x = torch.randn(2, g * g + n_cls, dim, dtype=torch.float64)
    q, k, v = attn.split_heads(x)
    patches = q[:, :, :-n_cls].reshape(2 * heads, g, g, dim // heads).permute(0, 3, 1, 2)
    r = F.adaptive_avg_pool2d(patches, (4, 4)).permute(0, 2, 3, 1).reshape(2, heads, 16, dim // heads)
    mixed = mita_attention(q, k, v, r, topk=8, backend="reference")
    expect = attn.proj(mixed.transpose(1, 2).reshape(2, -1, dim))
    torch.testing.assert_close(attn(x), expect)
    # moving the class tokens' queries leaves every landmark, hence every patch's routing, unchanged
    tl = attn.layout_of(x.shape[1])
    assert (tl.prefix, tl.body, tl.suffix) == (0, g * g, n_cls)
    q2 = q.clone()
    q2[:, :, -n_cls:] += 10.0
    torch.testing.assert_close(attn.landmark(q2, tl, None), r)
    # and the class tokens take part as keys: changing one changes the patches' outputs
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(attn(x2)[:, : g * g], attn(x)[:, : g * g])
