"""SequenceClassifier: single and pair inputs, padding invariance, long inputs without N x N memory."""

from __future__ import annotations

import pytest
import torch

from mita.models import SequenceClassifier, build_model, sinusoidal_positions
from mita.nn import MiTAAttention

KIND_KW = {"agent": dict(num_landmarks=4), "topk": dict(topk=6), "moba": dict(block_size=8, top_blocks=2)}


@pytest.mark.parametrize("kind", ["mita", "full", "agent", "moba", "topk", "linear"])
def test_padding_does_not_change_the_prediction(kind):
    torch.manual_seed(0)
    model = SequenceClassifier(30, 3, 64, dim=32, depth=2, attention=kind, **KIND_KW.get(kind, {}))
    model = model.double().eval()
    tokens = torch.randint(1, 30, (1, 40))
    padded = torch.cat((tokens, torch.zeros(1, 24, dtype=torch.long)), dim=1)
    torch.testing.assert_close(model(padded), model(tokens), rtol=1e-9, atol=1e-9)


def test_mita_defaults_are_lra_settings():
    model = SequenceClassifier(10, 2, 128)
    attn = model.blocks[0].attn
    assert isinstance(attn, MiTAAttention)
    assert (attn.num_landmarks, attn.topk, attn.layout, attn.prefix_tokens) == (16, 16, "seq", 0)
    agent = SequenceClassifier(10, 2, 128, attention="agent").blocks[0].attn
    assert agent.num_landmarks == 32


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_pair_model_trains_one_step(pos):
    torch.manual_seed(1)
    model = build_model("seq", vocab_size=20, num_classes=2, max_len=96, dim=32, pair=True, pos=pos)
    a, b = torch.randint(1, 20, (4, 96)), torch.randint(1, 20, (4, 80))
    a[:, 70:] = 0
    loss = torch.nn.functional.cross_entropy(model((a, b)), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    rebuilt = build_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())


def test_pair_feature_is_a_b_product_difference():
    torch.manual_seed(2)
    model = SequenceClassifier(20, 2, 32, dim=16, pair=True, attention="full").eval()
    a, b = torch.randint(1, 20, (2, 32)), torch.randint(1, 20, (2, 32))
    ea, eb = model.encode(a), model.encode(b)
    torch.testing.assert_close(model((a, b)), model.head(torch.cat((ea, eb, ea * eb, ea - eb), -1)))


def test_sinusoidal_table_known_values():
    t = sinusoidal_positions(5, 4)
    torch.testing.assert_close(t[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(t[3, 0], torch.sin(torch.tensor(3.0)))
    torch.testing.assert_close(t[3, 3], torch.cos(torch.tensor(3.0 / 100.0)))


def test_bad_inputs_raise():
    model = SequenceClassifier(10, 2, 16, dim=16)
    with pytest.raises(ValueError, match="length 20 exceeds max_len=16"):
        model(torch.randint(1, 10, (1, 20)))
    with pytest.raises(ValueError, match="pair=True"):
        SequenceClassifier(10, 2, 16, dim=16, pair=True)(torch.randint(1, 10, (1, 8)))
    with pytest.raises(ValueError, match="pos must be"):
        SequenceClassifier(10, 2, 16, pos="rotary")


def test_16k_tokens_without_quadratic_memory():
    """N = 16384: an N x N float32 score matrix per head would be 1 GiB; MiTA's torch path needs MBs."""
    torch.manual_seed(3)
    model = SequenceClassifier(10, 2, 16384, dim=32, depth=1, num_heads=2).eval()
    tokens = torch.randint(1, 10, (1, 16384))
    tokens[:, 15000:] = 0
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        out = model(tokens)
    # Total bytes allocated by each op kind over the whole forward (an upper bound on any one tensor).
    worst = max(prof.key_averages(), key=lambda e: e.cpu_memory_usage)
    assert out.shape == (1, 2) and torch.isfinite(out).all()
    assert worst.cpu_memory_usage < 256 * 2**20, (
        f"{worst.key} allocated {worst.cpu_memory_usage / 2**20:.0f} MiB"
    )
