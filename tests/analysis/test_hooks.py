"""RoutingRecorder: records exactly what mita_attention routes, per layer, and restores the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mita
from mita.analysis import RoutingRecorder, routing_layers
from mita.nn import MiTAAttention

from .toys import ToyMiTA, ToySeq


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ToyMiTA(8, 2, 3, 4, prefix=1), nn.GELU(), ToyMiTA(8, 2, 3, 4, prefix=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_recorder_matches_the_op_and_restores_the_model():
    torch.manual_seed(0)
    net = ToyNet()
    assert [name for name, _ in routing_layers(net)] == ["blocks.0", "blocks.2"]
    x1, x2 = torch.randn(3, 10, 8), torch.randn(2, 10, 8)
    with RoutingRecorder(net) as rec:
        assert all(mod.record_routing for _, mod in routing_layers(net))
        rec.run([(x1, None), x2])
    assert not any(mod.record_routing for _, mod in routing_layers(net))
    assert not net.blocks[0]._forward_hooks  # hooks removed

    # recompute layer 0's routing directly with the op
    first = net.blocks[0]
    q, k, v = first.qkv(torch.cat([x1, x2])).reshape(5, 10, 3, 2, 4).permute(2, 0, 3, 1, 4)
    _, want = mita.mita_attention(
        q, k, v, mita.landmarks.pool_1d(q[:, :, 1:], 3), topk=4, return_routing=True
    )
    got = rec.layers[0].routing()
    assert got.expert_index.shape == (5, 2, 10, 1) and got.key_index.shape == (5, 2, 3, 4)
    assert torch.equal(got.expert_index.long(), want.expert_index)
    assert torch.equal(got.key_index.long().sort(-1).values, want.key_index.sort(-1).values)
    assert rec.layers[1].prefix_tokens == 1 and rec.layers[1].layout.layout == "seq"
    assert rec.layers[0].padding_mask() is None  # no padding was given

    stats = rec.stats()
    assert len(stats) == 2 and stats[0].num_tokens == 10 and stats[0].prefix_tokens == 1
    assert stats[0].load_mean == pytest.approx(10 / 3)
    rec.clear()
    with pytest.raises(ValueError, match="recorded no forward"):
        rec.layers[0].routing()


def test_recorder_rejects_models_without_mita():
    with pytest.raises(ValueError, match="no MiTA attention layer"):
        RoutingRecorder(nn.Linear(3, 3))


def test_recorder_reads_the_layout_once_and_records_padding():

    torch.manual_seed(0)
    attn = MiTAAttention(16, 2, num_landmarks=4, topk=3, grid=(4, 4), prefix_tokens=1)
    with RoutingRecorder(attn) as rec:
        attn(torch.randn(2, 17, 16))
    layout = rec.layers[0].layout
    assert (layout.layout, layout.grid, layout.prefix_tokens) == ("grid", (4, 4), 1)
    assert (layout.num_landmarks, layout.landmark_mode, layout.landmark_grid) == (4, "pool", (2, 2))
    assert layout.to_dict()["grid"] == [4, 4]

    model = ToySeq()
    tokens = torch.randint(1, 16, (5, 24))
    tokens[:2, 18:] = 0
    tokens[4, 10:] = 0
    with RoutingRecorder(model) as rec:
        rec.run([tokens[:3], tokens[3:]])  # two batches
    for layer in rec.layers:
        assert torch.equal(layer.padding_mask(), tokens == 0)  # what the model gave, not guessed
    assert all(block.last_key_padding_mask is None for block in model.blocks)  # restored


def test_recorder_refuses_layers_that_do_not_say_their_layout():
    class Silent(nn.Module):
        record_routing = False

    with pytest.raises(ValueError, match="does not say its layout, prefix_tokens"):
        RoutingRecorder(nn.Sequential(Silent()))
