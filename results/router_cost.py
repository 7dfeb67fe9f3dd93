"""Training-step cost of causal MiTA's routers (``MiTACausal(router=...)``) on the MQAR GPT of
``results/causal.py``: every router's model takes one AdamW step per round on the same batch, the
routers interleaved round by round in one process (so all see the same machine load); the median of
``--rounds`` rounds (after one warm-up round) is reported, with its ratio to ``argmax``. As in ``mita
train``, the distillation draws its queries among the rows with a target (the answers).

    python3 results/router_cost.py --rounds 6 --seq-len 512 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal import MQAR_MODEL  # noqa: E402

from mita.data import build_dataset
from mita.models import build_model
from mita.nn.causal_router import objective_rows
from mita.train.objective import IGNORE_INDEX, loss_fn


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
    p.add_argument("--routers", nargs="+", default=["argmax", "gate", "distill", "gate+distill"])
    a = p.parse_args(argv)

    torch.set_num_threads(1)
    ds = build_dataset("mqar", "train", seed=0, seq_len=a.seq_len, num_pairs=a.pairs, vocab_size=a.vocab)
    x, y = (torch.stack(t) for t in zip(*(ds[i] for i in range(a.batch_size))))
    built = {}
    for router in a.routers:
        torch.manual_seed(0)
        kw = {**MQAR_MODEL, "block_size": a.block_size, "topk": a.topk, "landmark_horizon": a.horizon}
        m = build_model("gpt", vocab_size=ds.info.vocab_size, max_len=ds.info.seq_len, attention="mita",
                        router=router, **kw)  # fmt: skip
        built[router] = (m, torch.optim.AdamW(m.parameters(), 1e-3))
    times: dict[str, list[float]] = {r: [] for r in built}
    for rnd in range(a.rounds + 1):  # round 0 warms up
        for router, (m, opt) in built.items():
            t0 = time.perf_counter()
            with objective_rows(m, y != IGNORE_INDEX):  # as mita train: the distillation samples the answers
                loss = loss_fn(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rnd:
                times[router].append(time.perf_counter() - t0)
    base = statistics.median(times[a.routers[0]])
    print(f"| router | step ms | vs `{a.routers[0]}` |\n|---|---:|---:|")
    for router, ts in times.items():
        med = statistics.median(ts)
        print(f"| `{router}` | {1000 * med:,.0f} | {med / base:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
