"""``context_parallel_attention`` on 1-4 gloo processes against the single-process op (float64)."""

import sys

import pytest
import torch

from mita.distributed import comm_stats, context_parallel_attention
from mita.distributed.selection import merge_candidates, topk_lowest_index
from mita.distributed.sequence import check_context_parallel_model
from mita.models.sequence import SequenceClassifier
from mita.ops.api import cpu_available

from . import workers
from .spawn import run_ranks

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(), reason="gloo processes forked on Linux"
)
TOL = 1e-12


def _assert_close(errors_by_rank, what):
    for rank, errors in enumerate(errors_by_rank):
        names = ["output", "dq", "dk", "dv", "dlandmarks"]
        bad = {n: e for n, e in zip(names, errors, strict=True) if not e <= TOL}
        assert not bad, f"{what}, rank {rank}: {bad}"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_equals_single_process_op(world):
    names = list(workers.EQUALITY_CASES) if world == 2 else ["gqa", "two_experts_dedup", "padding"]
    results = run_ranks(world, workers.equality, names)
    for name in names:
        _assert_close([r[name] for r in results], f"{name}, P={world}")


def test_ties_go_to_the_lower_index_as_the_cpu_kernel():
    if not cpu_available()[0]:
        pytest.skip("the CPU kernel is not built here")
    results = run_ranks(2, workers.ties)
    for r in results:
        assert r["straddling_ties"] > 0  # equal scores at the k-th place: the tie rule decides the keys
        assert r["cpu_kernel_picks_lowest_index"]
    _assert_close([r["errors"] for r in results], "integer inputs with ties")


def test_bfloat16_inputs():
    for err in run_ranks(2, workers.half_precision):
        assert err <= 2**-7  # one bf16 rounding of outputs of magnitude < 2


def test_group_of_one_is_the_plain_op():
    _assert_close(run_ranks(1, workers.size_one_groups), "world of one")
    _assert_close(run_ranks(2, workers.size_one_groups), "one-rank subgroups of two ranks")


def test_bytes_do_not_depend_on_n():
    m_local, topk = 2, 4
    for world in (2, 3):
        short, long = zip(*(r for r in run_ranks(world, workers.bytes_by_length, [16, 32], m_local, topk)))
        for rank in range(world):
            assert short[rank] == long[rank]
        # the formula (docs/distributed.md), per rank: B = 2, H = 4, Hkv = 2, d = 8, dv = 6, float64
        b, h, m, d, dv, f = 2, 4, world * m_local, 8, 6, 8
        sent = short[0]
        assert (
            sent["landmarks/forward"] == sent["landmarks/backward"] == (world - 1) * b * h * m_local * d * f
        )
        assert sent["shared_partials/forward"] == (world - 1) * b * h * m * (dv + 2) * f
        assert sent["candidates/forward"] == 2 * (world - 1) * b * h * m * topk * f  # scores + int64 indices
        rows = b * h * m * topk * (d + dv) * f
        assert sent["rows/forward"] == sent["rows/backward"] == round(2 * (world - 1) * rows / world)


def test_bad_shards_are_rejected_on_every_rank():
    results = run_ranks(2, workers.uneven)
    for rank, msgs in enumerate(results):
        assert len(msgs) == 5, msgs
        assert "shards differ across ranks" in msgs[0] and "'N_kv': [12.0, 11.0]" in msgs[0]
        if rank == 0:
            assert "invalid on rank(s) [1]" in msgs[1]
        else:
            assert "topk must be an int in 1..N=24, got 0" in msgs[1]
        assert "every key as padding in batch rows [1]" in msgs[2]
        assert "not divisible by the 2 ranks" in msgs[3]
        assert msgs[4] == "(2, 4, 12, 6)"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_causal_frozen_equals_single_process_op(world):
    results = run_ranks(world, workers.causal_equality, 4, 12 if world < 4 else 8)
    for name in workers.CAUSAL_CASES:
        _assert_close([r[name] for r in results], f"causal {name}, P={world}")


def test_causal_rejects_what_it_does_not_support():
    for msgs in run_ranks(2, workers.causal_errors):
        assert len(msgs) == 3
        assert "landmark_horizon='frozen' only" in msgs[0]
        assert "multiple of block_size=5" in msgs[1]
        assert "needs n // block_size = 3 local landmarks, got 2" in msgs[2]


def test_needs_a_process_group():
    x = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="process group"):
        context_parallel_attention(x, x, x, x[:, :, :1], topk=2)
    with comm_stats() as stats:
        pass
    assert stats.total() == 0


def test_topk_lowest_index_and_merge():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [float("-inf")] * 3 + [0.0, 0.0, 5.0]])
    vals, idx = topk_lowest_index(x, 3)
    assert idx.tolist() == [[1, 2, 4], [3, 4, 5]] and vals.tolist() == [[3.0, 3.0, 3.0], [0.0, 0.0, 5.0]]
    # candidates from two ranks, given out of index order: equal scores go to the lower index
    v = torch.tensor([[2.0, 7.0, 2.0, 2.0]])
    i = torch.tensor([[9, 4, 1, 5]])
    mv, mi = merge_candidates(v, i, 3)
    assert mi.tolist() == [[1, 4, 5]] and mv.tolist() == [[2.0, 7.0, 2.0]]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 4, (5, 17), generator=g).double()
        order = torch.sort(-x, dim=-1, stable=True).indices[:, :6].sort(-1).values
        assert torch.equal(topk_lowest_index(x, 6)[1], order)


@pytest.mark.parametrize(("world", "pair"), [(2, False), (4, True)])
def test_context_parallel_sequence_classifier(world, pair):
    """Logits, loss and the DDP-averaged gradients of the sharded classifier equal the plain model's."""
    for rank, errors in enumerate(run_ranks(world, workers.sequence_model, pair)):
        assert max(errors) <= TOL, f"rank {rank}: logits, loss, gradients {errors}"


def test_sequence_models_it_cannot_split_are_refused():
    def seq(**kw):
        return SequenceClassifier(11, 3, 48, dim=16, depth=1, num_heads=2, **kw)

    check_context_parallel_model(seq(num_landmarks=4, topk=4), 4)
    with pytest.raises(ValueError, match="needs MiTA attention; block 0 has FullAttention"):
        check_context_parallel_model(seq(attention="full"), 2)
    with pytest.raises(ValueError, match="num_landmarks=6, not a multiple of the 4 ranks"):
        check_context_parallel_model(seq(num_landmarks=6, topk=4), 4)
    with pytest.raises(ValueError, match="landmark_mode='learned'"):
        check_context_parallel_model(seq(num_landmarks=4, topk=4, landmark_mode="learned"), 2)
    with pytest.raises(ValueError, match="runs the sequence classifier, not Linear"):
        check_context_parallel_model(torch.nn.Linear(2, 2), 2)


def test_context_parallel_groups_under_ddp():
    """4 ranks: 2 groups of 2 sharing a batch each, DDP over all 4: the plain data-parallel gradient."""
    import torch.distributed.fsdp  # noqa: F401, PLC0415  (DDP imports it lazily: once here, not in every forked rank)

    for rank, err in enumerate(run_ranks(4, workers.context_and_data_parallel, 2)):
        assert err <= TOL, f"rank {rank}: {err}"
