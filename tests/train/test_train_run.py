"""``mita train`` / ``mita eval`` end to end on a tiny ListOps configuration, in-process."""

import json

import pytest
import torch

from mita.analysis import eval_cli
from mita.data import build_dataset
from mita.data.fmnist import fmnist_dir
from mita.train import cli, evaluate
from mita.train.checkpoint import load_model

from .helpers import TINY

SUMMARY_KEYS = {
    "task", "attention", "test_accuracy", "best_test_accuracy", "steps", "wall_time_s", "train_samples_per_s",
    "peak_memory_bytes", "config", "hardware", "torch_version",
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run") / "mita"
    args = TINY + ["--max-steps", "8", "--log-every", "2", "--eval-every", "4", "--cache-dir", cache_dir,
                   "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    return out


def test_summary_and_metrics(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["task"] == "listops" and summary["attention"] == "mita" and summary["steps"] == 8
    assert summary["model_kwargs"]["num_landmarks"] == 4 and summary["model_kwargs"]["topk"] == 4
    assert 0.0 <= summary["test_accuracy"] <= summary["best_test_accuracy"] <= 1.0
    assert summary["train_samples_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    # every 2 steps, plus the epoch end at step 6
    assert train_steps == [2, 4, 6, 8]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [4, 6, 8]  # every 4 steps and at the epoch end
    assert evals[-1]["test_accuracy"] == summary["test_accuracy"]
    assert max(r["test_accuracy"] for r in evals) == summary["best_test_accuracy"]
    lrs = [r["lr"] for r in records if r["event"] == "train"]
    assert lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs, lrs[1:]))  # cosine ends at zero


def test_saved_model_reloads_and_reproduces_accuracy(run_dir, cache_dir):
    model, meta = load_model(run_dir)
    assert meta["task"] == "listops" and meta["attention"] == "mita" and meta["model"] == "seq"
    assert meta["model_kwargs"]["max_len"] == 64 and meta["step"] == 8

    test = build_dataset("listops", "test", size=16, seq_len=64, cache_dir=cache_dir)
    result = evaluate.evaluate(model, test, batch_size=5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["n"] == 16
    assert result["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    # the same count written out by hand
    with torch.no_grad():
        preds = torch.stack([model(x.unsqueeze(0)).argmax(-1)[0] for x, _ in test])
    labels = torch.tensor([y for _, y in test])
    assert result["test_accuracy"] == (preds == labels).float().mean().item()
    # by task name: the data settings the model was trained with (seq_len=64) come from its metadata
    by_name = evaluate.evaluate(model, "listops", max_samples=16)
    assert by_name["n"] == 16 and by_name["test_accuracy"] == result["test_accuracy"]


def test_eval_cli_with_json_and_swap(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(run_dir), "--test-size", "16", "--json", str(out)]
    assert eval_cli.main(args) == 0
    report = json.loads(out.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["test_accuracy"] == summary["test_accuracy"] and report["n"] == 16
    assert "accuracy" in capsys.readouterr().out
    # checkpoint swap: same weights under full attention, and MiTA with other m, k
    assert eval_cli.main(["--checkpoint", str(run_dir), "--test-size", "16", "--attention", "full",
                          "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["attention"] == "full"
    assert eval_cli.main(["--checkpoint", str(run_dir), "--test-size", "16", "--num-landmarks", "8",
                          "--topk", "2", "--json", str(out)]) == 0  # fmt: skip
    swapped = json.loads(out.read_text())
    assert (swapped["attention"], swapped["num_landmarks"], swapped["topk"]) == ("mita", 8, 2)


def test_evaluate_counts_against_a_known_model():
    # logits = x: the prediction is the argmax of the input row
    x = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    y = torch.tensor([0, 1, 0, 3, 2, 1])
    data = torch.utils.data.TensorDataset(x, y)
    result = evaluate.evaluate(torch.nn.Identity(), data, batch_size=4)
    assert result["n"] == 6 and result["test_accuracy"] == pytest.approx(4 / 6)
    first3 = evaluate.evaluate(torch.nn.Identity(), data, max_samples=3)
    assert first3["n"] == 3 and first3["test_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="max_samples"):
        evaluate.evaluate(torch.nn.Identity(), data, max_samples=0)


def test_fmnist_vit_smoke(tmp_path):
    if not (fmnist_dir() / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "vit"
    args = ["--task", "fmnist", "--preset", "tiny", "--train-size", "32", "--test-size", "16",
            "--batch-size", "8", "--max-steps", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    model, meta = load_model(out)
    assert meta["model"] == "vit_fmnist" and meta["model_kwargs"]["embed_dim"] == 16
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
