"""Training-step cost of causal MiTA's routers (``MiTACausal(router=...)``) on the MQAR GPT of
``results/causal.py``: every router's model takes one AdamW step per round on the same batch, the
routers interleaved round by round in one process (so all see the same machine load); the median of
``--rounds`` rounds (after one warm-up round) is reported, with its ratio to ``argmax``. As in ``mita
train``, the distillation draws its queries among the rows with a target (the answers).

    python3 results/router_cost.py --rounds 6 --seq-len 512 --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal import MQAR_MODEL, speed_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print a markdown table: router, median step ms, ratio to ``argmax``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--horizon", default="frozen")
    routers = ["argmax", "gate", "distill", "gate+distill", "gate+distill+select"]
    p.add_argument("--routers", nargs="+", default=routers)
    a = p.parse_args(argv)

    data = {"seq_len": a.seq_len, "num_pairs": a.pairs, "vocab_size": a.vocab}
    kw = {**MQAR_MODEL, "block_size": a.block_size, "topk": a.topk, "landmark_horizon": a.horizon}
    models = {router: {**kw, "router": router} for router in a.routers}
    res = speed_run("mqar", data, models, dict.fromkeys(a.routers, "mita"), a.batch_size, a.rounds)
    step_ms = {r: 1000 * a.batch_size * a.seq_len / tok for r, tok in res["tokens_per_s"].items()}
    base = step_ms[a.routers[0]]
    print(f"| router | step ms | vs `{a.routers[0]}` |\n|---|---:|---:|")
    for router, ms in step_ms.items():
        print(f"| `{router}` | {ms:,.0f} | {ms / base:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
