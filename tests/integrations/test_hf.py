"""Hugging Face integration: MiTA as an attn_implementation of a tiny random BERT encoder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, BertConfig, BertModel, ViTConfig, ViTModel  # noqa: E402

from mita.integrations import hf  # noqa: E402
from mita.nn import MiTAAttention  # noqa: E402


def _bert() -> BertModel:
    cfg = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    return ids, mask


def test_routed_only_with_k_equal_n_is_full_attention_including_padding():
    """shared=False and k = N: each query's one expert holds every key, i.e. exact softmax attention."""
    model = _bert()
    ids, mask = _inputs()
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation(hf.register("mita_full_equiv", shared=False, topk=24, num_landmarks=4))
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_default_mita_ignores_padding():
    model = _bert()
    model.set_attn_implementation(hf.register("mita_default", num_landmarks=4, topk=6))
    ids, mask = _inputs()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = model(input_ids=ids[1:, :15]).last_hidden_state
    torch.testing.assert_close(out[1:, :15], alone, rtol=1e-5, atol=1e-5)
    # without the mask the padded tokens are attended and the real tokens change
    unmasked = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(unmasked[1:, :15], alone, atol=1e-4)


def test_gqa_heads_arrive_unexpanded():
    torch.manual_seed(2)
    fn = hf.make_attention_function(num_landmarks=3, topk=4)
    q = torch.randn(2, 4, 12, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 12, 8, dtype=torch.float64), torch.randn(2, 2, 12, 8, dtype=torch.float64)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 9:] = False
    module = torch.nn.Module()
    out, weights = fn(module, q, k, v, keep, scaling=8**-0.5)
    expanded, _ = fn(module, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), keep, scaling=8**-0.5)
    assert out.shape == (2, 12, 4, 8) and weights is None
    torch.testing.assert_close(out, expanded)


def test_refuses_causal_dropout_and_foreign_masks():
    fn = hf.make_attention_function(num_landmarks=2, topk=2)
    q = torch.randn(1, 2, 8, 4)
    causal = torch.nn.Module()
    causal.is_causal = True
    with pytest.raises(ValueError, match="non-causal"):
        fn(causal, q, q, q, None)
    with pytest.warns(UserWarning, match=r"no attention dropout: .*\(0\.1\) is not applied"):
        out = fn(torch.nn.Module(), q, q, q, None, dropout=0.1)  # transformers' dropout in training mode
    torch.testing.assert_close(out[0], fn(torch.nn.Module(), q, q, q, None)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask function"):
        fn(torch.nn.Module(), q, q, q, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="'pool' or 'official'"):
        hf.make_attention_function(landmark_mode="learned")


def test_vit_encoder_with_grid_landmarks():
    cfg = ViTConfig(
        image_size=12, patch_size=3, num_channels=1, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    x = torch.randn(2, 1, 12, 12)
    ref = model(pixel_values=x).last_hidden_state  # 1 cls + 4x4 patches
    model.set_attn_implementation(
        hf.register("mita_vit_full", layout="grid", prefix_tokens=1, num_landmarks=4, topk=17, shared=False)
    )
    torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    model.set_attn_implementation(
        hf.register("mita_vit", layout="grid", prefix_tokens=1, num_landmarks=4, topk=5)
    )
    out = model(pixel_values=x).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)


def test_default_settings_work_on_sequences_shorter_than_m_and_k():
    """Defaults m = k = 16 on N = 10 tokens: both are clipped to N, as if given m = k = 10."""
    model = _bert()
    ids = torch.randint(1, 50, (2, 10))
    model.set_attn_implementation(hf.register("mita_short"))
    out = model(input_ids=ids).last_hidden_state
    model.set_attn_implementation(hf.register("mita_short_explicit", num_landmarks=10, topk=10))
    torch.testing.assert_close(out, model(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(num_landmarks=0), r"num_landmarks must be a positive int"),
        (dict(topk=-3), r"topk must be an int >= 1, got -3"),
        (dict(layout="bogus"), r"layout must be one of \('grid', 'seq'\), got 'bogus'"),
        (dict(experts_per_query=17), r"experts_per_query must be an int in 1..m=16"),
        (dict(shared="no"), r"shared must be True or False"),
        (dict(shared=False, routed=False), r"no expert"),
        (dict(landmark_scale=float("inf")), r"landmark_scale must be a positive number \(finite\)"),
        (dict(backend="bogus"), r"backend must be one of"),
        (dict(layout="grid", num_landmarks=5), r"square number"),
        (dict(prefix_tokens=-1), r"prefix_tokens must be a non-negative int"),
    ],
)
def test_register_checks_its_settings_before_registering(settings, match):
    with pytest.raises(ValueError, match=match):
        hf.register("mita_bad_settings", **settings)
    assert "mita_bad_settings" not in AttentionInterface._global_mapping


def test_builds_landmarks_once_and_mixes_with_the_module_code(monkeypatch):
    """The function reuses one landmark builder (a new one only for a clipped m) and calls
    ``mita.nn.mita.mita_mix``, the body of ``MiTAAttention.attend``: same output as the module's attend."""
    made, mixed = [], []
    real_builder, real_mix = hf.LandmarkBuilder, hf.mita_mix
    monkeypatch.setattr(hf, "LandmarkBuilder", lambda *a, **kw: made.append(a) or real_builder(*a, **kw))
    monkeypatch.setattr(hf, "mita_mix", lambda *a, **kw: mixed.append(1) or real_mix(*a, **kw))
    fn = hf.make_attention_function(num_landmarks=4, topk=5, experts_per_query=2)
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    for _ in range(3):
        out, _ = fn(torch.nn.Module(), q, k, v, None, scaling=8**-0.5)
    assert len(made) == 1 and len(mixed) == 3
    fn(torch.nn.Module(), q[:, :, :3], k[:, :, :3], v[:, :, :3], None)  # N = 3 < m: one clipped builder
    fn(torch.nn.Module(), q[:, :, :3], k[:, :, :3], v[:, :, :3], None)
    assert len(made) == 2
    mod = MiTAAttention(16, 2, layout="seq", prefix_tokens=0, num_landmarks=4, topk=5, experts_per_query=2)
    want = mod.double().attend(q, k, v, None, mod.layout_of(12))
    torch.testing.assert_close(out.transpose(1, 2), want, rtol=0, atol=0)


def test_landmarks_keyword_is_deprecated():
    with pytest.warns(DeprecationWarning, match="landmark_mode="):
        hf.make_attention_function(landmarks="official", num_landmarks=4)


def test_default_bert_config_trains_with_a_warning():
    """A default BertConfig (attention dropout 0.1) built with from_config is in training mode: its first
    forward runs, warning once per call site that the attention dropout is not applied."""
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    assert cfg.attention_probs_dropout_prob > 0
    model = BertModel(cfg)
    model.set_attn_implementation(hf.register("mita_bert_train", num_landmarks=4, topk=4))
    ids, mask = _inputs()
    with pytest.warns(UserWarning, match="no attention dropout"):
        out = model.train()(input_ids=ids, attention_mask=mask).last_hidden_state
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_vit_with_interpolated_position_encoding_infers_the_grid():
    cfg = ViTConfig(
        image_size=12, patch_size=3, num_channels=1, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    x = torch.randn(2, 1, 18, 18)  # a 6 x 6 patch grid; registered for 4 x 4
    model.set_attn_implementation(hf.register("mita_vit_4", layout="grid", grid=(4, 4), prefix_tokens=1,
                                              num_landmarks=4, topk=5))  # fmt: skip
    out = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    model.set_attn_implementation(hf.register("mita_vit_6", layout="grid", grid=(6, 6), prefix_tokens=1,
                                              num_landmarks=4, topk=5))  # fmt: skip
    want = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    model.set_attn_implementation("mita_vit_4")  # 12 x 18: a 4 x 6 grid, not of 4 x 4's aspect ratio
    with pytest.raises(ValueError, match="fit neither grid=\\(4, 4\\) nor a grid of its aspect ratio"):
        model(pixel_values=torch.randn(1, 1, 12, 18), interpolate_pos_encoding=True)
