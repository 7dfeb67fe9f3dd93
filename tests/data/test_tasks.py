"""Task registry and build_dataset argument checking."""

from __future__ import annotations

import pytest

from mita.data import PAD_ID, SPLITS, TASKS, TaskInfo, build_dataset, get_task


def test_registry_matches_contract():
    assert set(TASKS) == {
        "fmnist", "listops", "pathfinder", "image", "text", "retrieval", "shakespeare-char", "mqar",
        "fmnist-seg",
    }  # fmt: skip
    assert PAD_ID == 0
    for name, info in TASKS.items():
        assert isinstance(info, TaskInfo) and info.name == name
        assert info.kind in ("image", "sequence", "pair", "lm", "segmentation")
        if info.kind in ("image", "segmentation"):
            assert info.image_size and info.channels and info.vocab_size is None and info.seq_len is None
        else:
            assert info.vocab_size > 1 and info.seq_len > 0
    expected = {"listops": (2000, 16, 10), "pathfinder": (1024, 257, 2), "image": (1024, 257, 10)}
    expected |= {"text": (4000, 257, 3), "retrieval": (4000, 257, 2)}
    for name, (length, vocab, classes) in expected.items():
        assert (TASKS[name].seq_len, TASKS[name].vocab_size, TASKS[name].num_classes) == (
            length,
            vocab,
            classes,
        )
    assert TASKS["fmnist"].image_size == (28, 28) and TASKS["fmnist"].num_classes == 10
    assert TASKS["fmnist-seg"].image_size == (128, 128) and TASKS["fmnist-seg"].num_classes == 11


def test_get_task_unknown_lists_valid_names():
    assert get_task("listops") is TASKS["listops"]
    with pytest.raises(ValueError, match="unknown task 'cifar'.*fmnist.*listops.*retrieval"):
        get_task("cifar")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "nope", "split": "train"}, "unknown task"),
        ({"name": "listops", "split": "dev"}, "splits train, val, test; got 'dev'"),
        ({"name": "text", "split": "val"}, "splits train, test"),
        ({"name": "listops", "split": "train", "size": 0}, "positive int"),
        ({"name": "pathfinder", "split": "train", "seed": -1}, "seed must be a non-negative int, got -1"),
        ({"name": "listops", "split": "train", "size": 2.5}, "positive int"),
        ({"name": "listops", "split": "train", "seq_len": 8}, "seq_len must be an int >= 16"),
        ({"name": "pathfinder", "split": "train", "seq_len": 512}, "fixed length 1024; seq_len=512"),
        ({"name": "image", "split": "train", "seq_len": 2048}, "fixed length 1024"),
        ({"name": "listops", "split": "train", "augment": True}, "only defined for 'fmnist'"),
        ({"name": "text", "split": "train", "difficulty": "hard"}, "only applies to 'pathfinder'"),
        ({"name": "pathfinder", "split": "train", "difficulty": "extreme"}, "easy.*medium.*hard.*'extreme'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match, tmp_path):
    name, split = kwargs.pop("name"), kwargs.pop("split")
    with pytest.raises(ValueError, match=match):
        build_dataset(name, split, cache_dir=tmp_path, **kwargs)


def test_splits_cover_every_task():
    assert set(SPLITS) == set(TASKS)
    assert all("train" in s and "test" in s for s in SPLITS.values())
