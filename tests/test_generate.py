"""Generation with caches (GPT.generate) against recomputing the prefix, and the ``mita generate`` command."""

from __future__ import annotations

import pytest
import torch

from mita.generate import decode, encode_prompt, main
from mita.models import build_model
from mita.train.checkpoint import save_model_file

KINDS = ["full", "window", "moba", "mita"]


def _gpt(kind: str, vocab: int = 29, **kw):
    torch.manual_seed(1)
    cfg = {"vocab_size": vocab, "max_len": 48, "dim": 16, "depth": 2, "num_heads": 2, "block_size": 4,
           "topk": 3, "top_blocks": 2, **kw}  # fmt: skip
    return build_model("gpt", attention=kind, **cfg).double().eval()


def _greedy_by_recompute(model, idx, n):
    for _ in range(n):
        idx = torch.cat((idx, model(idx)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("kind, horizon", [(k, "prefix") for k in KINDS] + [("mita", "frozen")])
def test_greedy_generation_equals_recomputing_the_prefix(kind, horizon):
    model = _gpt(kind, landmark_horizon=horizon)
    prompt = torch.randint(0, 29, (2, 6))
    out = model.generate(prompt, 19, temperature=0)  # crosses block boundaries 8, 12, ..., 24
    assert out.shape == (2, 25) and torch.equal(out[:, :6], prompt)
    assert torch.equal(out, _greedy_by_recompute(model, prompt, 19))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [False, True])
def test_cached_logits_equal_parallel_logits(kind, shift):
    """Prefill a chunk, then one token at a time: every logit as in one parallel pass (float64)."""
    model = _gpt(kind, token_shift=shift)
    x = torch.randint(0, 29, (2, 23))
    cache = model.new_cache()
    steps = [model(x[:, :7], cache)] + [model(x[:, t : t + 1], cache) for t in range(7, 23)]
    torch.testing.assert_close(torch.cat(steps, 1), model(x), rtol=0, atol=1e-10)


def test_sampling_is_reproducible_and_respects_top_k():
    model = _gpt("full")
    prompt = torch.randint(0, 29, (1, 3))
    a = model.generate(prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, model.generate(prompt, 10, temperature=0))  # top-1 sampling is greedy
    g1, g2 = (model.generate(prompt, 10, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(g1, g2)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative int"),
        ({"max_new_tokens": 2, "temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"max_new_tokens": 2, "temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"max_new_tokens": 2, "temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"max_new_tokens": 2, "top_k": 0}, "top_k must be a positive int"),
    ],
)
def test_bad_generation_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _gpt("full").generate(torch.zeros(1, 3, dtype=torch.long), **kw)


def test_prompt_encoding():
    assert encode_prompt(256, "Hé", None) == [72, 195, 169]
    assert decode(256, [72, 195, 169]) == "Hé"
    assert encode_prompt(100, None, "3 17,5") == [3, 17, 5] and decode(100, [3, 17, 5]) == "3 17 5"
    for args, match in [
        ((256, "x", "1"), "exactly one of"),
        ((100, "text", None), "byte-level model"),
        ((100, None, "3 x"), "must be integers"),
        ((100, None, "3 100"), "outside the vocabulary"),
        ((256, "", None), "empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            encode_prompt(*args)


def test_generate_command_round_trip(tmp_path, capsys):
    model = build_model("gpt", attention="window", vocab_size=256, max_len=64, dim=16, depth=1, num_heads=2,
                        block_size=8)  # fmt: skip
    kwargs = {k: v for k, v in model.config.items() if k != "name"}
    path = save_model_file(tmp_path / "model.safetensors", model, {"model": "gpt", "model_kwargs": kwargs})
    rc = main(
        ["--checkpoint", str(path), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    expect = model.eval().generate(torch.tensor([list(b"ROMEO:")]), 12, temperature=0)
    assert text.rstrip("\n") == decode(256, expect[0].tolist()) and text.startswith("ROMEO:")
    # past the context (64) the window slides: 100 new tokens after a prompt of 70
    long = ["--prompt", "x" * 70, "--max-new-tokens", "100", "--temperature", "0"]
    assert main(["--checkpoint", str(path), *long]) == 0
    expect = _greedy_sliding(model, torch.tensor([list(b"x" * 70)]), 100)
    assert capsys.readouterr().out.rstrip("\n") == decode(256, expect[0].tolist())
    for bad, match in ((["--temperature", "nan"], "temperature"), (["--device", "cuda:7"], "--device")):
        assert main(["--checkpoint", str(path), "--prompt", "R", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err


def _greedy_sliding(model, idx, n):
    """Known answer by recomputing: the model sees ``idx[start:]``; the window starts anew at the last
    3/4 max_len tokens when it would exceed max_len (a longer prompt starts at its last max_len)."""
    ctx, keep = model.max_len, 3 * model.max_len // 4
    start = max(0, idx.shape[1] - ctx)
    for _ in range(n):
        idx = torch.cat((idx, model(idx[:, start:])[:, -1].argmax(-1, keepdim=True)), dim=1)
        if idx.shape[1] - start > ctx:
            start = idx.shape[1] - keep
    return idx


@pytest.mark.parametrize("kind", KINDS)
def test_generation_slides_past_the_context(kind):
    model = _gpt(kind)  # max_len 48
    for prompt_len, n in ((6, 80), (60, 30)):  # a short prompt run past the context; a longer prompt
        prompt = torch.randint(0, 29, (2, prompt_len))
        out = model.generate(prompt, n, temperature=0)
        assert out.shape == (2, prompt_len + n) and torch.equal(out[:, :prompt_len], prompt)
        assert torch.equal(out, _greedy_sliding(model, prompt, n))
