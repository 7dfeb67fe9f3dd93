"""Our ViT: builds and trains with every attention kind, rebuilds from config, matches timm's keys."""

from __future__ import annotations

import pytest
import torch

from mita.convert import convert
from mita.models import MODEL_NAMES, build_model, vit_fmnist
from mita.nn import ATTENTION_KINDS, MiTAAttention

SMALL = dict(embed_dim=32, depth=2, num_heads=2)
KIND_KW = {"agent": dict(num_landmarks=9), "topk": dict(topk=9), "moba": dict(block_size=16, top_blocks=2)}


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_vit_fmnist_trains_one_step(kind):
    torch.manual_seed(0)
    model = vit_fmnist(attention=kind, **SMALL, **KIND_KW.get(kind, {}))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.isfinite(loss)


def test_vit_fmnist_preset_shape():
    model = vit_fmnist()
    attn = model.blocks[0].attn
    assert isinstance(attn, MiTAAttention)
    assert (attn.num_landmarks, attn.topk, attn.grid, attn.prefix_tokens) == (25, 25, (14, 14), 1)
    assert model.pos_embed.shape == (1, 197, 128) and len(model.blocks) == 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_build_model_rebuilds_from_config():
    model = vit_fmnist(attention="mita", num_landmarks=16, topk=9, **SMALL)
    clone = build_model(**model.config)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(clone(x), model(x))
    assert clone.blocks[1].attn.topk == 9
    assert set(MODEL_NAMES) >= {"vit_fmnist", "vit_tiny", "vit_small", "vit_base", "seq"}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50")


def test_bad_image_size_raises():
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 28, 28\]"):
        vit_fmnist(**SMALL)(torch.randn(1, 1, 32, 32))


def _timm():
    return pytest.importorskip("timm")


@pytest.mark.parametrize(
    "name,timm_name", [("vit_tiny", "vit_tiny_patch16_224"), ("vit_small", "vit_small_patch16_224")]
)
def test_state_dict_keys_and_shapes_equal_timms(name, timm_name):
    timm = _timm()
    ours = build_model(name, attention="full", depth=2)
    ref = timm.create_model(timm_name, pretrained=False, depth=2)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }


def test_timm_checkpoint_loads_and_gives_timms_outputs():
    timm = _timm()
    torch.manual_seed(1)
    kw = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    ours = build_model("vit_tiny", attention="full", **kw).eval()
    ours.load_state_dict(ref.state_dict())  # strict: identical names and shapes
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # and back: our weights (trained with any kind) load into timm and give the same outputs under full
    ours = build_model("vit_tiny", attention="mita", **kw).eval()
    ref.load_state_dict(ours.state_dict())

    torch.testing.assert_close(convert(ours, "full")(x), ref(x), rtol=1e-5, atol=1e-5)
