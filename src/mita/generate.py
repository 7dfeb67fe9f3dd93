"""``mita generate``: continue a prompt with a trained :class:`mita.models.GPT` checkpoint.

    mita generate --checkpoint runs/shakespeare-char-mita-s0 --prompt "ROMEO:" --max-new-tokens 300

Byte-level models (vocabulary 256, e.g. ``shakespeare-char``) take ``--prompt`` text and print text;
other vocabularies (``mqar``) take ``--prompt-ids "3 17 5"`` and print token ids. Decoding uses the
model's own cache (:meth:`mita.models.GPT.generate`; one :class:`mita.MiTACache` per layer for MiTA).
``--temperature 0`` is greedy. Past the model's context the window slides (see
:meth:`mita.models.GPT.generate`): a longer prompt is cropped to its last context window.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mita.models.gpt import GPT
from mita.system import resolve_device
from mita.train.checkpoint import CheckpointError, load_model

__all__ = ["encode_prompt", "decode", "main"]

BYTE_VOCAB = 256


def encode_prompt(vocab_size: int, text: str | None, ids: str | None) -> list[int]:
    """Token ids of the prompt: UTF-8 bytes of ``text`` (byte-level vocabularies) or the integers ``ids``."""
    if (text is None) == (ids is None):
        raise ValueError("give exactly one of --prompt (text) and --prompt-ids (token ids)")
    if text is not None:
        if vocab_size != BYTE_VOCAB:
            raise ValueError(
                f"--prompt text needs a byte-level model (vocabulary {BYTE_VOCAB}); this one has "
                f"{vocab_size} tokens: use --prompt-ids"
            )
        tokens = list(text.encode("utf-8"))
    else:
        try:
            tokens = [int(t) for t in ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be integers separated by spaces, got {ids!r}") from None
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"--prompt-ids {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}")
    if not tokens:
        raise ValueError("the prompt is empty")
    return tokens


def decode(vocab_size: int, tokens: list[int]) -> str:
    """Text (byte-level vocabularies; invalid UTF-8 shown as U+FFFD) or space-separated ids."""
    if vocab_size == BYTE_VOCAB:
        return bytes(tokens).decode("utf-8", errors="replace")
    return " ".join(map(str, tokens))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mita generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run directory or a .safetensors file of a GPT")
    p.add_argument("--prompt", help="prompt text (byte-level models)")
    p.add_argument("--prompt-ids", help="prompt token ids, e.g. '3 17 5' (any vocabulary)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    return p


def main(argv: list[str] | None = None) -> int:
    """Print the prompt and its continuation; 2 (with a message) on bad input or a non-GPT checkpoint."""
    args = _parser().parse_args(argv)

    try:
        device = resolve_device(args.device)
        model, _ = load_model(args.checkpoint, device=device)
        if not isinstance(model, GPT):
            raise ValueError(f"{args.checkpoint} holds a {type(model).__name__}, not a GPT language model")
        tokens = encode_prompt(model.vocab_size, args.prompt, args.prompt_ids)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        idx = torch.tensor([tokens], device=device)
        out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator=gen)
    except (ValueError, CheckpointError) as err:
        print(f"mita generate: {err}", file=sys.stderr)
        return 2
    print(decode(model.vocab_size, out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
