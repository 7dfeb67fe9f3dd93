"""Context-parallel MiTA on gloo processes of this machine: bytes per collective and wall time.

``python -m mita.bench.context_parallel bytes`` runs the forward and backward of one layer at several
sequence lengths and world sizes and records, per rank, the bytes each collective sends
(:func:`mita.distributed.comm_stats`) next to the formula and to an all-gather of K/V.
``python -m mita.bench.context_parallel time`` times the forward + backward of P = 2 processes against
one process (one thread each): wall time, and each rank's CPU time (less sensitive to a loaded machine).
Both print JSON. On one machine the processes share its cores and memory: the times are a CPU
simulation of the communication pattern, not a cluster measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mita.distributed import comm_stats, context_parallel_attention
from mita.io import write_json
from mita.landmarks import pool_1d
from mita.ops import mita_attention
from mita.system import cpu_model

SHAPE = {"b": 1, "h": 4, "hkv": 4, "d": 64, "dv": 64, "m": 64, "k": 64}


def formula(n: int, p: int, b: int, h: int, hkv: int, d: int, dv: int, m: int, k: int, f: int) -> dict:
    """Bytes one rank sends per layer (forward, backward) for MiTA CP and for all-gather K/V; payloads of
    ``f`` bytes per number, int64 key indices (the consistency check's few bytes left out)."""
    kl = min(k, n // p)
    m = (m // p) * p  # every rank pools m // P landmarks
    mita_fwd = {
        "landmarks": (p - 1) * b * h * (m // p) * d * f,
        "shared_partials": (p - 1) * b * h * m * (dv + 2) * f,
        "candidates": (p - 1) * b * h * m * kl * (f + 8),
        "rows": 2 * (p - 1) * b * h * m * k * (d + dv) * f / p,
    }
    mita_bwd = {key: mita_fwd[key] for key in ("landmarks", "shared_partials", "rows")}
    kv = (p - 1) * b * hkv * (n // p) * (d + dv) * f
    return {
        "mita_forward": sum(mita_fwd.values()),
        "mita_backward": sum(mita_bwd.values()),
        "allgather_kv_forward": kv,
        "allgather_kv_backward": kv,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(n: int, m_local: int, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = SHAPE
    q = torch.randn(s["b"], s["h"], n, s["d"], generator=g).to(dtype)
    k = torch.randn(s["b"], s["hkv"], n, s["d"], generator=g).to(dtype)
    v = torch.randn(s["b"], s["hkv"], n, s["dv"], generator=g).to(dtype)
    return [t.requires_grad_() for t in (q, k, v)] + [pool_1d(q, m_local)]


def _bytes_rank(rank: int, world: int, n: int) -> dict[str, Any]:
    q, k, v, r = _inputs(n // world, SHAPE["m"] // world, rank, torch.float32)
    with comm_stats() as stats:
        out = context_parallel_attention(q, k, v, r, topk=SHAPE["k"])
        out.sum().backward()
    return {"forward": stats.by_label("forward"), "backward": stats.by_label("backward")}


def _time_rank(rank: int, world: int, n: int, repeats: int) -> dict[str, Any]:
    q, k, v, r = _inputs(n // world, SHAPE["m"] // world, rank, torch.float32)
    times, cpu = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        context_parallel_attention(q, k, v, r, topk=SHAPE["k"]).sum().backward()
        cpu.append(time.process_time() - c0)  # this rank's CPU time (gloo's own threads included)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return {"seconds": times[1:], "cpu_seconds": cpu[1:]}


def _entry(rank: int, world: int, port: int, fn, args: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )  # fmt: skip
    try:
        res = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
        json.dump(res, fh)


def run_ranks(world: int, fn, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` forked gloo processes; their JSON results in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry, args=(world, _free_port(), fn, args, out_dir), nprocs=world, start_method="fork"
        )
        out = []
        for r in range(world):
            with open(os.path.join(out_dir, f"{r}.json")) as fh:
                out.append(json.load(fh))
    return out


def bytes_table(lengths: list[int], worlds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for p in worlds:
        for n in lengths:
            measured = run_ranks(p, _bytes_rank, n)
            fwd = {lab: b for lab, b in measured[0]["forward"].items() if lab != "check"}
            bwd = measured[0]["backward"]
            ref = formula(n, p, f=4, **SHAPE)
            rows.append({
                "P": p, "N": n, "forward": fwd, "backward": bwd,
                "check_bytes": measured[0]["forward"]["check"],
                "mita_forward": sum(fwd.values()), "mita_backward": sum(bwd.values()), "formula": ref,
                "same_on_every_rank": all(r == measured[0] for r in measured),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def time_table(n: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)

    res = {"N": n, "shape": SHAPE, "threads_per_process": 1, "cpu": cpu_model()}
    for p in (1, 2):
        ranks = run_ranks(p, _time_rank, n, repeats)
        res[f"cp_P{p}"] = statistics.median(ranks[0]["seconds"])
        res[f"cp_P{p}_cpu_per_rank"] = max(statistics.median(r["cpu_seconds"]) for r in ranks)
        print(json.dumps(res), flush=True)
    q, k, v, r = _inputs(n, SHAPE["m"], 0, torch.float32)
    for backend in ("torch", "auto"):
        times, cpu = [], []
        for _ in range(repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            mita_attention(q, k, v, r, topk=SHAPE["k"], backend=backend).sum().backward()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        res[f"single_process_{backend}"] = statistics.median(times[1:])
        res[f"single_process_{backend}_cpu"] = statistics.median(cpu[1:])
        print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["bytes", "time"])
    ap.add_argument("--lengths", default="16384,65536,262144")
    ap.add_argument("--worlds", default="2,3,4")
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    if a.what == "bytes":
        res: Any = bytes_table([int(x) for x in a.lengths.split(",")], [int(x) for x in a.worlds.split(",")])
    else:
        res = time_table(a.n, a.repeats)
    if a.out:
        write_json(a.out, res)


if __name__ == "__main__":
    main()
