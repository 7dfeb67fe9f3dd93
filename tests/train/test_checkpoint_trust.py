"""A checkpoint's metadata is not trusted: only sizes and kinds reach ``timm.create_model``, only a timm
model name (no hub or local path), and nothing it names is loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mita.analysis import eval_cli
from mita.models.timm_models import PREFIX, build_timm
from mita.train import checkpoint as ckpt

timm = pytest.importorskip("timm")

SMALL = dict(depth=1, embed_dim=32, num_heads=2, img_size=16, patch_size=8, num_classes=3)


def _crafted(tmp_path, name: str, **model_kwargs) -> str:
    path = tmp_path / "crafted.safetensors"
    meta = {"task": "fmnist", "attention": "full", "model": PREFIX + name,
            "model_kwargs": {"attention": "full", **SMALL, **model_kwargs}}  # fmt: skip
    ckpt.save_model_file(path, nn.Linear(2, 2), meta)
    return str(path)


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail loudly if anything is loaded from disk or a model is created from the metadata."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"loaded from the metadata: {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)


@pytest.mark.parametrize(
    "key, value",
    [
        ("checkpoint_path", "/any/file.pth"),
        ("pretrained", True),
        ("pretrained_cfg_overlay", {"file": "/any/file.pth"}),
        ("cache_dir", "/tmp"),
        ("act_layer", "os.system"),
    ],
)
def test_metadata_settings_outside_the_allow_list_are_refused(tmp_path, no_loading, key, value):
    path = _crafted(tmp_path, "vit_tiny_patch16_224", **{key: value})
    with pytest.raises(ckpt.CheckpointError, match=key):
        ckpt.load_model(path)


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_tiny_patch16_224", "local-dir:/tmp/x", "not_a_model"])
def test_a_name_timm_does_not_know_is_refused(tmp_path, no_loading, name):
    with pytest.raises(ckpt.CheckpointError, match="not a timm model"):
        ckpt.load_model(_crafted(tmp_path, name))


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"model": 5, "model_kwargs": {}}, "model builder"),
        ({"model": "gpt", "model_kwargs": [1]}, "model_kwargs"),
        ([1, 2], "model builder"),
    ],
)
def test_metadata_of_the_wrong_shape_is_refused(tmp_path, meta, match):
    path = tmp_path / "odd.safetensors"
    ckpt.save_model_file(path, nn.Linear(2, 2), meta)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_model(path)


def test_a_string_setting_must_be_a_plain_word(tmp_path, no_loading):
    with pytest.raises(ckpt.CheckpointError, match="global_pool"):
        ckpt.load_model(_crafted(tmp_path, "vit_tiny_patch16_224", global_pool="../../x"))


def test_mita_eval_refuses_a_crafted_checkpoint_in_one_line(tmp_path, capsys, no_loading):
    path = _crafted(tmp_path, "vit_tiny_patch16_224", checkpoint_path="/any/file.pth")
    assert eval_cli.main(["--checkpoint", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint_path" in err


def test_a_timm_run_still_round_trips(tmp_path):
    torch.manual_seed(0)
    kw = dict(SMALL, drop_path_rate=0.1, global_pool="avg", num_landmarks=4, topk=2)
    model = build_timm("vit_tiny_patch16_224", "mita", **kw).eval()
    meta = {"task": "fmnist", "attention": "mita", "model": PREFIX + "vit_tiny_patch16_224",
            "model_kwargs": {"attention": "mita", **kw}}  # fmt: skip
    ckpt.save_model_file(tmp_path / "ok.safetensors", model, meta)
    loaded, _ = ckpt.load_model(tmp_path / "ok.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_torch_floor_has_safe_loading_defaults():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    floors = re.findall(r'"torch>=([0-9.]+)"', text)
    # torch.load defaults to weights_only=True from 2.6 on
    assert len(floors) == 1 and tuple(int(v) for v in floors[0].split(".")) >= (2, 6)
