"""GPT (mita.models.gpt): shapes, exact causality of every attention kind, tied weights, bad input."""

from __future__ import annotations

import pytest
import torch

from mita.models import GPT, build_model

OPTS = {"block_size": 4, "topk": 3, "top_blocks": 2}
KINDS = ["full", "window", "moba", "mita"]


def _gpt(kind: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = {"vocab_size": 23, "max_len": 40, "dim": 16, "depth": 2, "num_heads": 2, **OPTS, **kw}
    return build_model("gpt", attention=kind, **cfg).double().eval()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_and_rebuild(kind):
    model = _gpt(kind)
    x = torch.randint(0, 23, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 23) and logits.dtype == torch.float64
    assert model.features(x).shape == (3, 17, 16)
    again = build_model(**model.config).double().eval()
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x), logits)


@pytest.mark.parametrize(
    "kind, horizon, shift",
    [(k, "prefix", s) for k in KINDS for s in (False, True)] + [("mita", "frozen", False)],
)
def test_changing_a_token_leaves_earlier_logits_bitwise_unchanged(kind, horizon, shift):
    model = _gpt(kind, landmark_horizon=horizon, token_shift=shift)
    x = torch.randint(0, 23, (2, 21))
    ref = model(x)
    for p in (0, 3, 4, 9, 20):
        x2 = x.clone()
        x2[:, p] = (x2[:, p] + 1 + torch.arange(2)) % 23
        out = model(x2)
        assert torch.equal(out[:, :p], ref[:, :p]), (kind, p)
        assert not torch.equal(out[:, p], ref[:, p])


def test_tied_embeddings_and_weight_decay_groups():
    model = _gpt("full")
    assert model.head.weight is model.tok_embed.weight
    names = dict(model.named_parameters())
    assert "head.weight" not in names  # one tensor, listed once
    nwd = model.no_weight_decay()
    assert nwd and all(names[n].ndim == 1 for n in nwd)
    assert {n for n, p in names.items() if p.ndim == 1} == nwd
    assert "tok_embed.weight" not in nwd and "blocks.0.attn.qkv.weight" not in nwd


def test_rope_off_and_on_differ_and_nope_is_permutation_blind_at_the_first_layer():
    with_rope, nope = _gpt("full"), _gpt("full", rope=None)
    x = torch.randint(0, 23, (1, 12))
    assert not torch.allclose(with_rope(x), nope(x))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"attention": "dense"}, "unknown causal attention kind 'dense'"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"dim": 15}, "dim=15 is not divisible by num_heads=2"),
        ({"attention": "window", "block_size": 0}, "block_size must be a positive int"),
        ({"num_landmarks": 3}, "unknown causal attention options"),
        ({"rope": -1.0}, "rope needs a positive theta"),
    ],
)
def test_bad_settings_raise(kw, match):
    cfg = {"vocab_size": 23, "max_len": 40, "dim": 16, "depth": 1, "num_heads": 2, "attention": "full", **kw}
    with pytest.raises(ValueError, match=match):
        GPT(**cfg)


def test_bad_inputs_raise():
    model = _gpt("full")
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="exceeds max_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(4, dtype=torch.long))
