"""Loss and accuracy for classifiers and language models (logits [B, T, V], targets -100 = no loss):
known answers, the evaluation sums, and a whole training run on a tiny fake language-model task."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mita.train import evaluate, setup
from mita.train.config import TrainConfig
from mita.train.loop import train
from mita.train.objective import IGNORE_INDEX, bits_per_byte, hits, loss_fn

V, T = 7, 6


class TinyLM(nn.Module):
    """Logits [B, T, V] from the current token only (a bigram model)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


class FakeLM(torch.utils.data.Dataset):
    """Next-token sequences of a fixed cycle; targets only on the second half (like MQAR answers)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, V, (n, 1), generator=g)
        seq = (start + torch.arange(T + 1)) % V
        self.x, self.y = seq[:, :-1].clone(), seq[:, 1:].clone()
        self.y[:, : T // 2] = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _manual(logits, y):
    """Mean loss and accuracy over targets, written out position by position."""
    losses, right = [], 0
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            if y[b, t] != IGNORE_INDEX:
                losses.append(-torch.log_softmax(logits[b, t].double(), -1)[y[b, t]])
                right += int(logits[b, t].argmax() == y[b, t])
    return sum(losses) / len(losses), right, len(losses)


def test_language_model_loss_and_hits_count_targets_only():
    torch.manual_seed(0)
    logits = torch.randn(3, T, V)
    y = torch.randint(0, V, (3, T))
    y[0, :4] = IGNORE_INDEX
    y[2, 1] = IGNORE_INDEX
    loss, right, n = _manual(logits, y)
    assert loss_fn(logits, y).item() == pytest.approx(loss.item(), rel=1e-6)
    correct, targets = hits(logits, y)
    assert (int(correct), int(targets)) == (right, n) and n == 3 * T - 5
    # a classifier: every sample is a target
    cls_logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    assert int(hits(cls_logits, labels)[1]) == 5
    ref = -torch.log_softmax(cls_logits, -1)[torch.arange(5), labels].mean()
    assert loss_fn(cls_logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_bits_per_byte():
    assert bits_per_byte(2 * math.log(2), 2.0) == pytest.approx(1.0)
    assert bits_per_byte(1.0, None) is None and bits_per_byte(None, 1.0) is None
    assert bits_per_byte(float("nan"), 1.0) is None


def test_evaluate_a_language_model_against_the_hand_count():
    torch.manual_seed(1)
    model, data = TinyLM(), FakeLM(10, seed=0)
    result = evaluate.evaluate(model, data, batch_size=4)
    x = torch.stack([data[i][0] for i in range(10)])
    y = torch.stack([data[i][1] for i in range(10)])
    with torch.no_grad():
        loss, right, n = _manual(model(x), y)
    assert result["n"] == 10 and result["targets"] == n == 10 * (T - T // 2)
    assert result["test_accuracy"] == right / n
    assert result["test_loss"] == pytest.approx(loss.item(), rel=1e-6)  # float32 logits


def test_training_a_language_model_reports_loss_and_bits_per_byte(tmp_path, monkeypatch):
    info = SimpleNamespace(name="fake-lm", kind="lm", bytes_per_token=1.5)
    train_set, test_set = FakeLM(32, seed=0), FakeLM(12, seed=1)
    monkeypatch.setattr(setup, "_data", lambda cfg, preset: (train_set, test_set, info, {}))
    monkeypatch.setattr(setup, "_model", lambda cfg, preset, info: ("tiny_lm", {}, TinyLM()))
    out = tmp_path / "lm"
    cfg = TrainConfig(task="listops", batch_size=4, max_steps=16, lr=3e-2, log_every=8, out=str(out),
                      progress=False)  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 16
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 2 and losses[1] < losses[0]  # it learns the cycle
    # the summary's figures are those of the final model, recomputed here
    model = TinyLM()
    from safetensors.torch import load_model  # noqa: PLC0415

    load_model(model, str(out / "model.safetensors"))
    again = evaluate.evaluate(model, test_set)
    assert summary["test_loss"] == pytest.approx(again["test_loss"], rel=1e-9)
    assert summary["test_accuracy"] == again["test_accuracy"]
    assert summary["test_bits_per_byte"] == pytest.approx(again["test_loss"] / math.log(2) / 1.5)
    assert json.loads((out / "summary.json").read_text())["test_loss"] == summary["test_loss"]
