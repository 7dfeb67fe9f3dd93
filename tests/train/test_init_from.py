"""--init-from: weights from a mita run or a timm-key state dict, into any attention kind; --attn-only."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mita.models import build_model
from mita.train import cli
from mita.train.checkpoint import save_model_file
from mita.train.init_from import (
    InitFromError,
    apply,
    attn_only_names,
    bicubic_resample,
    freeze_for_attn_only,
    init_from,
    load_state_dict_file,
    resample_pos_embed,
)

from .helpers import TINY

# a small vit_fmnist: 28x28x1, patch 2 (14x14 grid + cls = 197 tokens), width 32, 2 blocks
SMALL = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
ATTN = {"mita": dict(num_landmarks=25, topk=25), "agent": dict(num_landmarks=49), "linear": {}, "full": {}}


def vit(attention: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vit_fmnist", attention=attention, **{**SMALL, **ATTN.get(attention, {}), **kw})


def full_run(tmp_path, seed: int = 0, **kw):
    """A 'run directory' holding a full-attention model.safetensors with mita metadata."""
    model = vit("full", seed, **kw)
    meta = {"task": "fmnist", "attention": "full", "model": "vit_fmnist", "model_kwargs": {}, "step": 7}
    save_model_file(tmp_path / "run" / "model.safetensors", model, meta)
    return model, tmp_path / "run"


@pytest.mark.parametrize("kind", ["mita", "agent", "linear", "full"])
def test_full_run_into_any_kind_keeps_every_shared_weight(tmp_path, kind):
    src, run = full_run(tmp_path)
    dst = vit(kind, seed=1)
    report = init_from(dst, run)
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert set(dst_sd) == set(src_sd)  # pool landmarks: no kind-specific parameters
    for key, value in src_sd.items():
        assert torch.equal(dst_sd[key], value), key
    assert report.loaded == len(src_sd) and not report.missing and not report.unexpected
    assert report.source_meta["attention"] == "full" and report.source_meta["step"] == 7


def test_new_parameters_keep_their_fresh_init(tmp_path):
    src, run = full_run(tmp_path)
    dst = vit("mita", seed=1, dwc=True, landmark_mode="learned")
    fresh = {k: v.clone() for k, v in dst.state_dict().items() if ".dwc." in k or ".landmark." in k}
    assert fresh, "the model should have DWC and learned-landmark parameters"
    report = init_from(dst, run)
    assert sorted(report.missing) == sorted(fresh)
    for key, value in fresh.items():
        assert torch.equal(dst.state_dict()[key], value), key
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_mita_run_back_into_full_reports_unexpected(tmp_path):
    torch.manual_seed(0)
    src = vit("mita", dwc=True)
    save_model_file(tmp_path / "m.safetensors", src, {"task": "fmnist", "attention": "mita"})
    dst = vit("full", seed=3)
    report = init_from(dst, tmp_path / "m.safetensors")
    assert report.unexpected and all(".dwc." in k for k in report.unexpected)
    for key, value in dst.state_dict().items():
        assert torch.equal(value, src.state_dict()[key]), key


def _timm_vit(timm, **kw):
    """timm's ViT with the shape of the small vit_fmnist (built offline, no pretrained weights)."""
    args = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    return timm.models.vision_transformer.VisionTransformer(**{**args, "mlp_ratio": 2.0, **kw}).eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_state_dict_loads_and_gives_timms_outputs(tmp_path, fmt):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = _timm_vit(timm)
    path = tmp_path / f"timm.{fmt}"
    if fmt == "pth":
        torch.save({"model": ref.state_dict()}, path)  # a common checkpoint layout, unwrapped on load
    else:
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file(ref.state_dict(), str(path))
    full = vit("full", seed=5).eval()
    report = init_from(full, path)
    assert report.source_meta is None and not report.unexpected and not report.missing
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(full(x), ref(x), rtol=1e-5, atol=1e-5)
    mita = vit("mita", seed=5)
    init_from(mita, path)
    for key, value in ref.state_dict().items():
        assert torch.equal(mita.state_dict()[key], value), key


def test_other_grid_refused_without_flag_resampled_with_it(tmp_path):
    src, run = full_run(tmp_path)  # 14x14 grid
    dst = vit("mita", seed=1, img_size=32)  # 16x16 grid
    with pytest.raises(InitFromError, match="pos_embed.*--resize-pos-embed"):
        init_from(dst, run)
    report = init_from(dst, run, resize_pos_embed=True)
    assert report.resized and dst.pos_embed.shape == (1, 257, 32)
    torch.testing.assert_close(dst.pos_embed, resample_pos_embed(src.pos_embed.detach(), (16, 16)))
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # class token position kept
    for key, value in src.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(dst.state_dict()[key], value), key


def test_resampling_known_answers_and_timm_agreement():
    dim = 4
    const = torch.randn(1, 1, dim).expand(1, 1 + 49, dim).clone()  # a constant grid stays constant
    out = bicubic_resample(const, (10, 10))
    assert out.shape == (1, 101, dim)
    torch.testing.assert_close(out, const[:, :1].expand(1, 101, dim))
    same = torch.randn(1, 1 + 36, dim)
    torch.testing.assert_close(bicubic_resample(same, (6, 6)), same)  # same grid: identity
    with pytest.raises(InitFromError, match="square"):
        resample_pos_embed(torch.randn(1, 1 + 35, dim), (6, 6))
    timm = pytest.importorskip("timm")
    pos = torch.randn(1, 1 + 14 * 14, dim)
    for grid in ((16, 16), (7, 7), (10, 12)):
        ref = timm.layers.resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=1)
        torch.testing.assert_close(bicubic_resample(pos, grid), ref)


def test_other_patch_size_refused_even_with_resize(tmp_path):
    _, run = full_run(tmp_path)
    dst = vit("mita", seed=1, patch_size=4, num_landmarks=9, topk=9)  # 7x7 grid, other conv kernel
    with pytest.raises(InitFromError, match=r"patch_embed\.proj\.weight.*patch size"):
        init_from(dst, run, resize_pos_embed=True)


def test_new_head_for_another_number_of_classes(tmp_path):
    src, run = full_run(tmp_path)
    dst = vit("mita", seed=1, num_classes=5)
    fresh_head = dst.head.weight.detach().clone()
    with pytest.raises(InitFromError, match="head.weight.*--new-head"):
        init_from(dst, run)
    report = init_from(dst, run, new_head=True)
    assert sorted(report.new_head) == ["head.bias", "head.weight"]
    assert torch.equal(dst.head.weight, fresh_head)
    for key, value in src.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(dst.state_dict()[key], value), key


def test_another_architecture_is_refused(tmp_path):
    _, run = full_run(tmp_path)
    deeper = vit("mita", seed=1, depth=3)
    with pytest.raises(InitFromError, match="lacks .*blocks.2"):
        init_from(deeper, run)
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InitFromError, match="no tensor of the file matches"):
        init_from(vit("mita"), tmp_path / "other.pt")
    with pytest.raises(InitFromError, match="does not exist"):
        init_from(vit("mita"), tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(InitFromError, match="unknown weights format"):
        init_from(vit("mita"), tmp_path / "w.npz")


_EXECUTED = []


class _Evil:
    def __reduce__(self):
        return (_EXECUTED.append, ("ran",))


def test_crafted_pickle_is_refused_and_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "payload": _Evil()}, path)
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    for p in (path, legacy):
        with pytest.raises(InitFromError, match="weights-only"):
            load_state_dict_file(p)
    assert _EXECUTED == []


def test_attn_only_freezes_exactly_the_rest_and_they_do_not_move():
    model = vit("mita", seed=0, dwc=True)
    trainable, total = freeze_for_attn_only(model)
    names = dict(model.named_parameters())
    expected = {
        n for n in names if ".attn." in n or n.startswith("head.") or n == "pos_embed"
    }  # attention (incl. its DWC), head, position embedding
    assert {n for n, p in names.items() if p.requires_grad} == expected == set(attn_only_names(model))
    assert {"cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.1.mlp.fc1.weight",
            "norm.weight"} <= set(names) - expected  # fmt: skip
    assert trainable == sum(names[n].numel() for n in expected) and total == sum(
        p.numel() for p in names.values()
    )
    before = {n: p.detach().clone() for n, p in names.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # even given every parameter, frozen ones stay
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    for n, p in names.items():
        if n in expected:
            assert p.grad is not None and not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n


def test_apply_hook(tmp_path):
    src, run = full_run(tmp_path)
    logs: list[str] = []
    cfg = SimpleNamespace(init_from=str(run), attn_only=True, resize_pos_embed=False, new_head=False)
    model = vit("mita", seed=1)
    info = apply(model, cfg, log=logs.append)
    assert info["init_from"]["loaded"] == len(src.state_dict())
    assert info["attn_only"]["trainable_params"] < info["attn_only"]["total_params"]
    assert any("init-from" in line for line in logs) and any("trainable" in line for line in logs)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    logs.clear()
    other = vit("mita", seed=1)
    apply(other, cfg, resuming=True, log=logs.append)  # resume: the run's own checkpoint wins
    assert any("ignored" in line for line in logs)
    assert not torch.equal(other.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert apply(vit("mita"), SimpleNamespace()) == {}
    with pytest.raises(InitFromError, match="only apply with --init-from"):
        apply(vit("mita"), SimpleNamespace(new_head=True))


def test_mita_train_init_from_a_full_run_with_attn_only(tmp_path, cache_dir):
    """End to end: a full-attention run, then ``--init-from`` it into MiTA with ``--attn-only``."""
    from safetensors.torch import load_file  # noqa: PLC0415

    base = TINY + ["--max-steps", "3", "--cache-dir", cache_dir]
    assert cli.main(base + ["--attention", "full", "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "mita"
    args = ["--attention", "mita", "--init-from", str(tmp_path / "full"), "--attn-only", "--out", str(out)]
    assert cli.main(base + args) == 0
    src = load_file(str(tmp_path / "full" / "model.safetensors"))
    dst = load_file(str(out / "model.safetensors"))
    assert set(src) == set(dst)
    moved = {k for k in dst if not torch.equal(dst[k], src[k])}
    assert moved and all(".attn." in k or k.startswith("head.") or k == "pos_embed" for k in moved)
    assert any(".attn.qkv." in k for k in moved)  # the attention did train
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3  # a fresh run: its own schedule from step 0
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["init_from"]["source"]["attention"] == "full" and meta["attn_only"]["trainable_params"] > 0
    # bad combinations fail before any work, with the flag named
    assert cli.main(base + ["--new-head", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(base + ["--init-from", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
