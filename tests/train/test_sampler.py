"""ResumableSampler: a permutation per (seed, epoch), disjoint rank shards, exact mid-epoch start."""

import pytest

from mita.train.sampler import ResumableSampler


def test_shards_partition_the_epoch():
    data = list(range(40))
    shards = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 20
    assert sorted(shards[0] + shards[1]) == data
    assert shards[0] != sorted(shards[0])  # shuffled


def test_order_depends_on_seed_and_epoch_only():
    data = list(range(30))
    a, b = ResumableSampler(data, seed=1), ResumableSampler(data, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(ResumableSampler(data, seed=2)) != list(ResumableSampler(data, seed=1))


def test_start_skips_exactly_the_prefix_and_resets_per_epoch():
    s = ResumableSampler(list(range(25)), seed=0)
    s.set_epoch(1)
    full = list(s)
    s.set_start(10)
    assert list(s) == full[10:]
    assert len(s) == 15
    s.set_epoch(1)
    assert list(s) == full


def test_bad_start():
    s = ResumableSampler(list(range(5)))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        s.set_start(6)
