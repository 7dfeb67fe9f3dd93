"""Routing statistics on crafted routings with hand-computed answers, and against a set-based brute force."""

from __future__ import annotations

import math

import pytest
import torch

from mita.analysis import (
    expert_iou,
    expert_load,
    layer_stats,
    load_entropy,
    pruned_fraction,
    selection_counts,
)


def crafted() -> tuple[torch.Tensor, torch.Tensor]:
    """B=1, H=2, N=6, m=2, k=2, s=1.

    head 0: landmark 0 picks keys {0,1}, landmark 1 picks {1,2}; queries 0,1,2,5 -> expert 0, 3,4 -> expert 1.
    head 1: landmark 0 picks {3,4}, landmark 1 picks {4,5}; every query -> expert 1 (expert 0 is empty).
    """
    key_index = torch.tensor([[[[0, 1], [1, 2]], [[3, 4], [4, 5]]]])
    expert_index = torch.tensor([[[0, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]]])[..., None]
    return expert_index, key_index


def test_selection_counts_by_hand():
    _, key_index = crafted()
    counts = selection_counts(key_index, 6)
    assert counts.tolist() == [[[1, 2, 1, 0, 0, 0], [0, 0, 0, 1, 2, 1]]]


def test_pruned_fraction_by_hand():
    _, key_index = crafted()
    # head 0 selects {0,1,2}, head 1 selects {3,4,5}: half of 6 unselected in each, none in the union
    assert pruned_fraction(key_index, 6).tolist() == [[0.5, 0.5]]
    assert pruned_fraction(key_index, 6, union_heads=True).tolist() == [0.0]
    # a cls prefix is not counted: head 0 leaves {3,4,5} of {1..5}, head 1 leaves {1,2} of {1..5}
    assert torch.allclose(pruned_fraction(key_index, 6, prefix_tokens=1), torch.tensor([[3 / 5, 2 / 5]]))
    # token 5 is padding: head 0 leaves {3,4} of {0..4}, head 1 leaves {0,1,2} of {0..4}
    pad = torch.tensor([[False] * 5 + [True]])
    got = pruned_fraction(key_index, 6, padding_mask=pad)
    assert torch.allclose(got, torch.tensor([[2 / 5, 3 / 5]]))


def test_expert_load_and_entropy_by_hand():
    expert_index, _ = crafted()
    load = expert_load(expert_index, 2)
    assert load.tolist() == [[[4.0, 2.0], [0.0, 6.0]]]
    ent = load_entropy(load)
    want0 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert torch.allclose(ent, torch.tensor([[want0, 0.0]]))
    assert torch.allclose(load_entropy(torch.ones(5)), torch.tensor(math.log(5)))
    pad = torch.tensor([[False] * 5 + [True]])
    assert expert_load(expert_index, 2, padding_mask=pad).tolist() == [[[3.0, 2.0], [0.0, 5.0]]]


def test_expert_load_counts_each_of_s_experts():
    # N=3, m=3, s=2: query 0 -> {0,1}, query 1 -> {1,2}, query 2 -> {1,0}
    expert_index = torch.tensor([[[[0, 1], [1, 2], [1, 0]]]])
    assert expert_load(expert_index, 3).tolist() == [[[2.0, 3.0, 1.0]]]


def test_expert_iou_by_hand():
    expert_index, key_index = crafted()
    iou = expert_iou(expert_index, key_index)
    # head 0: T0={0,1}, Q0={0,1,2,5}: 2/4; T1={1,2}, Q1={3,4}: 0/4
    # head 1: T0={3,4}, Q0={} (empty): 0/2; T1={4,5}, Q1={0..5}: 2/6
    assert torch.allclose(iou, torch.tensor([[[0.5, 0.0], [0.0, 1 / 3]]]))
    pad = torch.tensor([[False] * 5 + [True]])
    iou = expert_iou(expert_index, key_index, padding_mask=pad)
    # query 5 dropped: head 0 Q0={0,1,2}: 2/3; head 1 Q1={0..4}: T1={4,5} -> inter {4}, union 6
    assert torch.allclose(iou, torch.tensor([[[2 / 3, 0.0], [0.0, 1 / 6]]]))


def test_layer_stats_by_hand():
    expert_index, key_index = crafted()
    st = layer_stats(expert_index, key_index)
    assert (st.num_tokens, st.num_landmarks, st.topk, st.experts_per_query) == (6, 2, 2, 1)
    assert st.pruned == pytest.approx(0.5) and st.pruned_all_heads == pytest.approx(0.0)
    assert st.load_min == pytest.approx(1.0)  # (2 + 0) / 2
    assert st.load_mean == pytest.approx(3.0)
    assert st.load_max == pytest.approx(5.0)  # (4 + 6) / 2
    ent0 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert st.load_entropy == pytest.approx(ent0 / 2)
    assert st.load_entropy_norm == pytest.approx(ent0 / 2 / math.log(2))
    assert st.empty_experts == pytest.approx(0.25)
    # skip: head 0 mean (0.5 + 0)/2 = 0.25, head 1 only its used expert: 1/3
    assert st.iou_mean == pytest.approx((0.25 + 1 / 3) / 2)
    assert (st.iou_min, st.iou_max) == (pytest.approx(0.0), pytest.approx(0.5))
    assert (st.iou_head_min, st.iou_head_max) == (pytest.approx(0.25), pytest.approx(1 / 3))
    zero = layer_stats(expert_index, key_index, empty="zero")
    assert zero.iou_mean == pytest.approx((0.25 + 1 / 6) / 2)
    assert zero.iou_head_min == pytest.approx(1 / 6)
    assert set(st.to_dict()) >= {"pruned", "iou_mean", "load_entropy"}


def test_perfect_clustering_gives_iou_one():
    # each landmark's keys are exactly the queries routed to it: the "hard clustering" extreme
    key_index = torch.tensor([[[[0, 1], [2, 3]]]])
    expert_index = torch.tensor([[[0, 0, 1, 1]]])[..., None]
    st = layer_stats(expert_index, key_index)
    assert st.iou_mean == pytest.approx(1.0) and st.pruned == 0.0
    assert st.load_entropy_norm == pytest.approx(1.0) and st.empty_experts == 0.0


def brute_force(expert_index, key_index, prefix):
    """The definitions written out with Python sets, one (sample, head) at a time."""
    b, h, n, _ = expert_index.shape
    m = key_index.shape[2]
    pruned, ious, loads = [], [], []
    for bi in range(b):
        for hi in range(h):
            chosen = {int(t) for t in key_index[bi, hi].flatten()}
            pruned.append(sum(1 for t in range(prefix, n) if t not in chosen) / (n - prefix))
            for j in range(m):
                keys = {int(t) for t in key_index[bi, hi, j]}
                queries = {i for i in range(n) if j in expert_index[bi, hi, i].tolist()}
                loads.append(expert_index[bi, hi].flatten().tolist().count(j))
                ious.append(len(keys & queries) / len(keys | queries))
    return pruned, ious, loads


@pytest.mark.parametrize("s", [1, 2])
def test_against_brute_force(s):
    g = torch.Generator().manual_seed(s)
    b, h, n, m, k = 3, 2, 17, 4, 5
    key_index = torch.rand(b, h, m, n, generator=g).argsort(-1)[..., :k]
    expert_index = torch.rand(b, h, n, m, generator=g).argsort(-1)[..., :s]
    pruned, ious, loads = brute_force(expert_index, key_index, prefix=1)
    got_pruned = pruned_fraction(key_index, n, prefix_tokens=1)
    assert torch.allclose(got_pruned.flatten().double(), torch.tensor(pruned, dtype=torch.float64))
    got_iou = expert_iou(expert_index, key_index)
    assert torch.allclose(got_iou.flatten().double(), torch.tensor(ious, dtype=torch.float64))
    got_load = expert_load(expert_index, m)
    assert got_load.flatten().tolist() == [float(x) for x in loads]
    assert got_load.sum().item() == b * h * n * s


def test_bad_inputs_name_sizes():
    expert_index, key_index = crafted()
    with pytest.raises(ValueError, match=r"\[B, H, N, s\]"):
        layer_stats(expert_index[0], key_index)
    with pytest.raises(ValueError, match="disagree"):
        layer_stats(expert_index, key_index.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="num_tokens=3"):
        selection_counts(key_index, 3)
    with pytest.raises(ValueError, match="self-attention"):
        expert_iou(expert_index[:, :, :3], key_index)
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        pruned_fraction(key_index, 6, padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="prefix_tokens=6"):
        pruned_fraction(key_index, 6, prefix_tokens=6)
    with pytest.raises(ValueError, match="empty"):
        layer_stats(expert_index, key_index, empty="drop")
