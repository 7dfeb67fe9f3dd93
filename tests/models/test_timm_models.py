"""timm model names as presets: built offline with the attention swapped, timm weights load into them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mita.models.timm_models import PREFIX, build_timm, image_kwargs
from mita.nn.base import AttentionBase
from mita.train.init_from import init_from
from mita.train.presets import build, get_preset, model_spec, timm_preset

timm = pytest.importorskip("timm")

SMALL = dict(depth=2, embed_dim=48, num_heads=3)


def test_timm_name_is_a_preset_and_unknown_names_are_not():
    preset = timm_preset("vit_tiny_patch16_224")
    assert preset.builder == PREFIX + "vit_tiny_patch16_224" and preset.attention_kwargs["mita"]["topk"] == 25
    assert timm_preset("not_a_timm_model") is None


@pytest.mark.parametrize("kind", ["mita", "full"])
def test_timm_model_built_converted_and_loads_timm_weights(tmp_path, kind):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, **SMALL)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    kw = {"num_landmarks": 4, "topk": 4} if kind == "mita" else {}
    model = build_timm("vit_tiny_patch16_224", kind, num_classes=4, img_size=32, **SMALL, **kw)
    attn = [m for m in model.modules() if isinstance(m, AttentionBase)]
    assert len(attn) == 2 and all(m.grid == (2, 2) for m in attn)  # the layout from timm's patch grid
    assert model.config["name"] == PREFIX + "vit_tiny_patch16_224"
    report = init_from(model, tmp_path / "vit.pth")
    assert not report.missing and not report.unexpected
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    if kind == "full":  # same weights, same attention: same outputs as timm's own model
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_image_kwargs_only_where_they_differ():
    fmnist = SimpleNamespace(image_size=(28, 28), channels=1)
    assert image_kwargs("vit_fmnist", fmnist, {}) == {}  # existing runs keep their stored settings
    folder = SimpleNamespace(image_size=(32, 32), channels=3)
    assert image_kwargs("vit_fmnist", folder, {}) == {"img_size": 32, "in_chans": 3}
    assert image_kwargs(PREFIX + "vit_tiny_patch16_224", fmnist, {}) == {"img_size": 28, "in_chans": 1}
    assert image_kwargs("vit_fmnist", SimpleNamespace(image_size=None, channels=None), {}) == {}


def test_timm_name_through_presets_builds_for_the_task():

    preset = get_preset("imagefolder", "vit_tiny_patch16_224")
    info = SimpleNamespace(name="imagefolder", kind="image", num_classes=3, image_size=(32, 32), channels=1)
    builder, kw = model_spec(preset, info, "mita", {"num_landmarks": 4, "topk": 4}, {"depth": 1})
    assert builder == PREFIX + "vit_tiny_patch16_224"
    assert (kw["img_size"], kw["in_chans"], kw["num_classes"], kw["depth"]) == (32, 1, 3, 1)
    model = build(builder, kw)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown model preset 'vit_nope'.*timm model name"):
        get_preset("imagefolder", "vit_nope")
