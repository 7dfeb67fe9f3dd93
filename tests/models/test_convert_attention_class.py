"""mita.convert recognises timm's own ``Attention`` class, not any class that is merely named
``Attention`` (beit, levit, samvit, ...), and warns when a timm model's attention dropout is dropped."""

from __future__ import annotations

import warnings

import pytest
import torch

from mita.convert import convert, is_timm_attention

timm = pytest.importorskip("timm")

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("beit_base_patch16_224", SMALL),
        ("samvit_base_patch16", dict(SMALL, global_attn_indexes=(), use_rel_pos=False)),
        ("levit_128s", dict(img_size=32, num_classes=3)),
    ],
)
def test_a_class_merely_named_attention_is_not_converted(name, kw):
    model = timm.create_model(name, pretrained=False, **kw)
    named = [m for m in model.modules() if type(m).__name__ == "Attention"]
    assert named and not any(is_timm_attention(m) for m in named)
    with pytest.raises(
        ValueError, match=r"nothing to convert in .*found only \{'timm\.models\.[a-z_]+\.Attention'"
    ):
        convert(model, "mita")


def test_a_lookalike_with_qkv_is_not_timm_attention():
    cls = type("Attention", (torch.nn.Module,), {"__module__": "timm.models.fake"})
    fake = cls()
    fake.qkv = torch.nn.Linear(4, 12)
    assert not is_timm_attention(fake)
    real = timm.layers.Attention(8, num_heads=2)
    assert is_timm_attention(real)


@pytest.mark.parametrize("kind, warns", [("mita", True), ("linear", True), ("full", False)])
def test_dropped_attention_dropout_warns(kind, warns):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_drop_rate=0.2, **SMALL)
    kw = {"num_landmarks": 4, "topk": 4} if kind == "mita" else {}
    if warns:
        with pytest.warns(UserWarning, match=r"no attention dropout; .*attn_drop=0\.2 is dropped"):
            convert(model, kind, **kw)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            convert(model, kind, **kw)
        assert model.blocks[0].attn.attn_drop.p == 0.2
