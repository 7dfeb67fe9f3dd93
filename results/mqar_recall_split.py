"""Where a trained causal-MiTA MQAR model's routing fails: the first MiTA layer's routing recall and coverage
(:func:`mita.train.recall.routing_recall`'s terms) split by the block that holds the needed key and by the
query's block, on the first ``--examples`` test sequences of the run's own MQAR configuration.

MQAR puts its pairs first, so at N = 2048 with 128 pairs they fill blocks 0-3 (b = 64); a key in block
``u`` is visible to the landmarks ``j >= u`` only under the frozen horizon, and it competes with the pairs
of every earlier block for a place in their top-k. The last rows split each head's queries by the
landmark it chose: one of the pair blocks' own landmarks, or a later one (recall there is that head's).

    python3 results/mqar_recall_split.py runs/mqar-2048-s0 runs/mqar-2048-s1
"""

from __future__ import annotations

import argparse
import sys

import torch

from mita.data import build_dataset
from mita.nn.causal import MiTACausal
from mita.ops.causal import CausalRouting
from mita.train.checkpoint import load_model
from mita.train.recall import needed_positions, routing_recall


@torch.no_grad()
def split(run: str, examples: int) -> tuple[list[tuple[str, int, float, float]], int]:
    """Rows ``(label, queries, recall, coverage)`` (any head, first MiTA layer; the chosen-landmark rows per
    head) and the block size."""
    model, meta = load_model(run)
    if meta["task"] != "mqar":
        raise ValueError(f"{run}: an MQAR run is needed, got task {meta['task']!r}")
    mixers = [m for m in model.modules() if isinstance(m, MiTACausal)]
    if not mixers:
        raise ValueError(f"{run}: the model has no causal MiTA layer")
    if mixers[0].landmark_horizon != "frozen":
        raise ValueError(
            f"{run}: the split reads frozen key sets; this run used {mixers[0].landmark_horizon!r}"
        )
    ds = build_dataset("mqar", "test", seed=0, **meta.get("data_kwargs", {}))
    xs, ys = zip(*(ds[i] for i in range(min(examples, len(ds)))))
    x, y = torch.stack(xs), torch.stack(ys)
    mixers[0].record_routing = True
    model.eval()(x)
    routing = mixers[0].last_routing
    b = int(routing.block_size)
    bi, qi, need = needed_positions(x, y)
    far = (need >= 0) & (need // b != qi // b)  # what routing_recall counts (not its own-block queries)
    bi, qi, need = bi[far], qi[far], need[far]

    def row(name: str, sel: torch.Tensor, of: CausalRouting = routing) -> tuple[str, int, float, float]:
        r = routing_recall(of, bi[sel], qi[sel], need[sel])
        return name, int(sel.sum()), r["recall_any_head"], r["coverage_any_head"]

    rows = [row(f"needed key in block {u}", need // b == u) for u in sorted(set((need // b).tolist()))]
    blocks = qi // b  # the query blocks in four coarse bins
    lo, hi = int(blocks.min()), int(blocks.max()) + 1
    step = max(1, (hi - lo + 3) // 4)
    for a in range(lo, hi, step):
        z = min(a + step, hi)
        rows.append(
            row(
                f"query in block {a}-{z - 1}" if z > a + 1 else f"query in block {a}",
                (blocks >= a) & (blocks < z),
            )
        )
    rows.append(row("all", torch.ones_like(need, dtype=torch.bool)))
    # Which landmark each head chose: one of the blocks that hold pairs, or a later one. Each head's rows
    # are routing_recall on that head alone (its own hit rate and coverage).
    pair_blocks = int((need // b).max()) + 1 if len(need) else 0
    for h in range(routing.expert_index.shape[1]):
        one = routing._replace(
            expert_index=routing.expert_index[:, h : h + 1], key_index=routing.key_index[:, h : h + 1]
        )
        chosen = one.expert_index[bi, 0, qi, 0]
        rows.append(
            row(f"head {h} routed to a pair block's landmark (j < {pair_blocks})", chosen < pair_blocks, one)
        )
        rows.append(
            row(f"head {h} routed to a later landmark (j >= {pair_blocks})", chosen >= pair_blocks, one)
        )
    return rows, b


def main(argv: list[str] | None = None) -> int:
    """Print one markdown table per run: queries, recall and coverage by group."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="mita train run directories (MQAR, causal MiTA, frozen horizon)")
    p.add_argument("--examples", type=int, default=32, help="test sequences (default 32)")
    a = p.parse_args(argv)
    if a.examples < 1:
        p.error("--examples must be >= 1")
    torch.set_num_threads(1)
    for run in a.runs:
        rows, b = split(run, a.examples)
        print(f"\n{run} (first MiTA layer, b = {b}, {a.examples} test sequences, any head)\n")
        print("| group | queries | recall | coverage |\n|---|---:|---:|---:|")
        for name, n, rec, cov in rows:
            print(f"| {name} | {n} | {rec:.3f} | {cov:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
