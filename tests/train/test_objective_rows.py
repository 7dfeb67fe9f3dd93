"""``mita train`` tells the causal mixers which rows its objective reads (``targets != -100``): on MQAR the
routing distillation then samples the answers' rows, not the filler; with a loss on every token (a
language model) nothing is passed and the distillation samples uniformly as before."""

from __future__ import annotations

import torch

from mita.train import cli, loop
from mita.train.objective import sparse_targets

MQAR = ["--task", "mqar", "--attention", "mita", "--data-arg", "seq_len=64", "--data-arg", "num_pairs=4",
        "--data-arg", "vocab_size=32", "--curriculum", "32:2:2:4", "--max-steps", "2", "--batch-size", "4",
        "--block-size", "8", "--topk", "8", "--landmark-horizon", "frozen", "--test-size", "8",
        "--no-progress"]  # fmt: skip


def test_sparse_targets_known_answers():
    assert sparse_targets(torch.tensor([[1, -100, 2]]))
    assert not sparse_targets(torch.tensor([[1, 0, 2]]))  # a loss on every token
    assert not sparse_targets(torch.tensor([1, -100]))  # class labels
    assert not sparse_targets(torch.full((1, 2, 2), -100))  # per-pixel labels


def test_mqar_training_passes_the_answer_rows_to_the_mixers(tmp_path, cache_dir, monkeypatch):
    seen = []
    real = loop.objective_rows

    def spy(model, read):
        seen.append(None if read is None else read.clone())
        return real(model, read)

    monkeypatch.setattr(loop, "objective_rows", spy)
    argv = [*MQAR, "--cache-dir", cache_dir, "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    assert len(seen) == 4  # 2 curriculum steps, 2 task steps
    for read, (length, pairs) in zip(seen, [(32, 2), (32, 2), (64, 4), (64, 4)], strict=True):
        assert read.dtype == torch.bool and read.shape == (4, length)
        assert read.sum(1).tolist() == [pairs] * 4  # one answer per key: the only rows with a loss
