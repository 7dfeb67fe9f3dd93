"""mita.convert: timm ViTs and our models, to MiTA and back, weights and outputs preserved."""

from __future__ import annotations

import copy

import pytest
import torch

from mita.convert import convert, convert_module
from mita.models import vit_fmnist
from mita.nn import FullAttention, MiTAAttention, build_attention

TIMM_KW = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def test_timm_vit_to_mita_and_back():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KW).eval()
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, "full")
    assert all(isinstance(b.attn, FullAttention) for b in model.blocks)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    convert(model, "mita", num_landmarks=9, topk=16)
    attn = model.blocks[0].attn
    assert isinstance(attn, MiTAAttention) and attn.grid == (14, 14) and attn.prefix_tokens == 1
    assert set(model.state_dict()) == set(keys)  # state-dict names identical to timm's
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, keys[k])
    mita_out = model(x)
    assert not torch.allclose(mita_out, ref, atol=1e-4)  # MiTA is a different attention
    convert(model, "full")
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_own_model_round_trip_and_inference_mk_change():
    torch.manual_seed(1)
    model = vit_fmnist(embed_dim=32, depth=2, num_heads=2, num_landmarks=16, topk=9).eval()
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    convert(model, "full")
    convert(model, "mita", num_landmarks=16, topk=9)
    torch.testing.assert_close(model(x), ref)
    convert(model, "mita", topk=25)  # only k changes; m and the layout are kept
    attn = model.blocks[0].attn
    assert (attn.num_landmarks, attn.topk, attn.grid) == (16, 25, (14, 14))
    assert model.training is False and attn.training is False


def test_variant_weights_survive_conversion():
    torch.manual_seed(2)
    src = build_attention("mita", 32, 2, dwc=True, gate=True, qk_norm=True, num_landmarks=4, topk=5).double()
    dst = convert(src, "full")
    assert isinstance(dst, FullAttention) and dst.use_gate and dst.dwc is not None
    for name, tensor in dst.state_dict().items():
        torch.testing.assert_close(tensor, src.state_dict()[name])
    assert dst.qkv.weight.dtype == torch.float64
    back = convert(dst, "mita", num_landmarks=4, topk=5)
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    torch.testing.assert_close(back(x), src(x))


def test_convert_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown attention kind"):
        convert(torch.nn.Linear(2, 2), "flash")
    with pytest.raises(ValueError, match=r"does not take \['topk'\]"):
        convert(vit_fmnist(embed_dim=32, depth=1, num_heads=2), "full", topk=3)
    with pytest.raises(ValueError, match="cannot convert Linear"):
        convert_module(torch.nn.Linear(2, 2), "full")


def test_timm_qk_norm_and_scale_norm_convert_exactly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, qk_norm=True, scale_attn_norm=True, **TIMM_KW
    ).eval()
    for p in model.parameters():  # non-trivial norm weights
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    convert(model, "full")
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, torch.nn.LayerNorm) and isinstance(attn.norm, torch.nn.LayerNorm)
    torch.testing.assert_close(model(x), ref)


def _dynamic_vit(timm):
    torch.manual_seed(4)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **kw).eval()


def test_dynamic_img_size_timm_pools_over_each_inputs_grid():
    """A dynamic-size timm ViT tells the converted attention each input's grid (5x6 for 40x48 pixels),
    where a fixed 4x4 grid would treat 14 patches as extra tokens."""
    timm = pytest.importorskip("timm")

    model = convert(_dynamic_vit(timm), "mita", num_landmarks=4, topk=4)
    seen = {}
    attn = model.blocks[1].attn
    attn.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], out=out))
    attn.record_routing = True
    with torch.no_grad():
        model(torch.randn(2, 3, 40, 48))
        assert attn.input_grid == (5, 6) and attn.last_layout["grid"] == (5, 6)
        assert attn.layout_of(31).suffix == 0
        fixed = convert_module(attn, "mita", grid=(5, 6)).eval()  # same weights, the grid given by hand
        assert fixed.input_grid is None and fixed.grid == (5, 6)
        torch.testing.assert_close(seen["out"], fixed(seen["x"]), rtol=0, atol=0)
        model(torch.randn(1, 3, 24, 32))  # a new size: a new grid
        assert attn.input_grid == (3, 4)
        # a copy of the model tracks its own inputs, leaving the original's modules alone

        twin = copy.deepcopy(model)
        twin(torch.randn(1, 3, 16, 16))
        assert twin.blocks[1].attn.input_grid == (2, 2) and attn.input_grid == (3, 4)
        # converting again keeps one hook and the dynamic grid
        convert(model, "full")
        assert len(model.patch_embed._forward_hooks) == 1
        model(torch.randn(1, 3, 16, 24))
        assert model.blocks[0].attn.input_grid == (2, 3) and model.blocks[0].attn.grid is None


def test_dynamic_img_size_full_matches_timm_at_other_sizes():
    timm = pytest.importorskip("timm")
    model = _dynamic_vit(timm)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(convert(model, "full")(x), ref, rtol=1e-5, atol=1e-5)


def test_nothing_to_convert_raises_naming_the_classes():
    timm = pytest.importorskip("timm")
    from timm.models.eva import Eva  # noqa: PLC0415
    from timm.models.swin_transformer import SwinTransformer  # noqa: PLC0415

    eva = Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, use_rot_pos_emb=True)
    with pytest.raises(ValueError, match=r"nothing to convert in Eva: found only \{'EvaAttention': 1\}"):
        convert(eva, "mita")
    swin = SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1,), num_heads=(2,)
    )
    with pytest.raises(ValueError, match=r"nothing to convert in SwinTransformer: .*WindowAttention"):
        convert(swin, "mita")
    with pytest.raises(ValueError, match="found no attention module"):
        convert(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), "mita")
    assert timm is not None


def test_unconvertible_attention_beside_converted_warns():
    class PoolAttention(torch.nn.Module):  # an attention class mita does not know
        def forward(self, x):
            return x

    model = vit_fmnist(embed_dim=32, depth=1, num_heads=2)
    model.pool_attn = PoolAttention()
    with pytest.warns(UserWarning, match=r"left unconverted attention modules \{'PoolAttention': 1\}"):
        convert(model, "full")
    assert isinstance(model.blocks[0].attn, FullAttention)
