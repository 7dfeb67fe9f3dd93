"""Routing recall on MQAR (mita.train.recall): needed positions and hits, by hand-made routings."""

from __future__ import annotations

import pytest
import torch

from mita.ops.causal.common import CausalRouting
from mita.train.recall import needed_positions, routing_recall


def test_needed_position_is_one_past_the_first_occurrence():
    x = torch.tensor([[5, 9, 6, 8, 0, 6, 8, 5, 9, 0]])
    y = torch.full_like(x, -100)
    y[0, 5], y[0, 7] = 8, 9  # queries: key 6 at 5 (first seen at 2), key 5 at 7 (first seen at 0)
    b, q, need = needed_positions(x, y)
    assert b.tolist() == [0, 0] and q.tolist() == [5, 7] and need.tolist() == [3, 1]


def _routing(horizon: str) -> CausalRouting:
    # B=1, H=2, N=12, b=4: n_l = 3 landmarks, k = 2
    expert = torch.full((1, 2, 12, 1), -1, dtype=torch.long)
    expert[0, 0, 8:, 0], expert[0, 1, 8:, 0] = 0, 1  # block-2 queries: head 0 -> landmark 0, head 1 -> 1
    expert[0, :, 4:8, 0] = 0
    if horizon == "frozen":
        keys = torch.full((1, 2, 3, 2), -1, dtype=torch.long)
        keys[0, 0, 0], keys[0, 1, 1] = torch.tensor([1, 3]), torch.tensor([5, 6])
        keys[0, :, 0] = torch.tensor([1, 3])
    else:
        keys = torch.full((1, 2, 3, 3, 2), -1, dtype=torch.long)  # [B, H, query block, landmark, k]
        keys[0, :, 1, 0] = torch.tensor([1, 2])
        keys[0, 0, 2, 0], keys[0, 1, 2, 1] = torch.tensor([1, 3]), torch.tensor([5, 6])
    return CausalRouting(expert, keys, horizon, 4)


@pytest.mark.parametrize("horizon", ["prefix", "frozen"])
def test_recall_counts_hits_per_head_and_own_block(horizon):
    r = _routing(horizon)
    batch = torch.tensor([0, 0, 0, 0])
    query = torch.tensor([9, 10, 11, 6])
    needed = torch.tensor([3, 6, 0, 5])  # 9: head 0 holds 3; 10: head 1 holds 6; 11: nobody; 6: own block
    out = routing_recall(r, batch, query, needed)
    assert out["queries"] == 4 and out["own_block"] == pytest.approx(0.25)
    assert out["recall_any_head"] == pytest.approx(2 / 3)
    assert out["recall_mean_head"] == pytest.approx(2 / 6)
    assert out["routable"] == 1.0


def test_prefix_uses_the_set_seen_by_the_query_block():
    r = _routing("prefix")
    # query 5 (block 1) needs 2: in landmark 0's set as seen by block 1 ([1, 2]), not by block 2 ([1, 3])
    out = routing_recall(r, torch.tensor([0]), torch.tensor([5]), torch.tensor([2]))
    assert out["recall_any_head"] == 1.0
    out = routing_recall(r, torch.tensor([0]), torch.tensor([9]), torch.tensor([2]))
    assert out["recall_any_head"] == 0.0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="one shape"):
        needed_positions(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown landmark horizon"):
        routing_recall(CausalRouting(torch.zeros(1), torch.zeros(1), "all", 4), *[torch.zeros(1)] * 3)


def test_recall_split_into_coverage_routing_and_chance():
    """Frozen sets (n_l = 3): head 0 has landmark 0 = {1, 3}; head 1 landmark 0 = {1, 3}, landmark 1 =
    {5, 6}. Block-2 queries see landmarks 0 and 1; head 0 routes to 0, head 1 to 1."""
    r = _routing("frozen")
    query, needed = torch.tensor([9, 10, 11]), torch.tensor([3, 6, 0])
    out = routing_recall(r, torch.zeros(3, dtype=torch.long), query, needed)
    # 3: in landmark 0 of both heads (head 0 hits, head 1 misses); 6: head 1's landmark 1 (hit); 0: nowhere
    assert out["coverage_any_head"] == pytest.approx(2 / 3)
    assert out["coverage_mean_head"] == pytest.approx(3 / 6)
    assert out["routing_given_coverage_any_head"] == 1.0
    assert out["routing_given_coverage_mean_head"] == pytest.approx(2 / 3)
    assert out["chance_mean_head"] == pytest.approx((0.5 + 0.5 + 0.5) / 6)  # 1 of 2 visible sets, 3 times
    assert out["chance_any_head"] == pytest.approx((1 - 0.25 + 0.5 + 0) / 3)
    assert out["recall_any_head"] <= out["coverage_any_head"]
