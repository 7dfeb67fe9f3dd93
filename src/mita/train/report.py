"""Helpers for the ``results/`` scripts: run a set of trainings and label their results (tables and
files are written with :mod:`mita.io`)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def pct(x: float | None) -> str:
    """``0.8734 -> '87.34'``; missing -> an em dash."""
    return "—" if x is None or x != x else f"{100 * x:.2f}"


def attention_label(summary: dict[str, Any]) -> str:
    """``mita (m=25, k=25)``-style label from a run summary's model kwargs."""
    kw = summary.get("model_kwargs", {})
    parts = [f"{k}={kw[k]}" for k, short in (("num_landmarks", "m"), ("topk", "k")) if k in kw]
    parts = [p.replace("num_landmarks", "m").replace("topk", "k") for p in parts]
    return summary["attention"] + (f" ({', '.join(parts)})" if parts else "")


def train_args(options: dict[str, Any], switches: dict[str, bool] | None = None) -> list[str]:
    """``mita train`` arguments: ``--name value`` per option that is not None, then each switch that is on."""
    args = [str(x) for name, value in options.items() if value is not None for x in (name, value)]
    return args + [name for name, on in (switches or {}).items() if on]


#: Environment variable naming the terminal line of a run's progress bar (runs in parallel: one each).
PROGRESS_LINE_ENV = "MITA_PROGRESS_LINE"


def run_training(
    args: Sequence[str], threads: int | None = None, *, line: int | None = None
) -> dict[str, Any]:
    """Run ``python -m mita train ARGS`` in a fresh process and return its ``summary.json``.

    A separate process per run keeps each run's peak memory (RSS on CPU) its own.
    ``ARGS`` must contain ``--out DIR``. ``threads`` caps the process's intra-op CPU threads
    (for runs that share the machine); ``line`` puts the run's progress bar on that terminal line, below
    the first (runs in parallel each keep their own bar).
    """
    args = list(args)
    out = Path(args[args.index("--out") + 1])
    if "--resume" in args and not (out / "checkpoints" / "latest.json").is_file():
        args.remove("--resume")  # not started yet: start it (mita train --resume needs a checkpoint)
    env = None
    if threads is not None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if line is not None:
        env = {**(env or os.environ), PROGRESS_LINE_ENV: str(line)}
    res = subprocess.run([sys.executable, "-m", "mita", "train", *args], env=env)
    if res.returncode != 0:
        raise RuntimeError(f"mita train {' '.join(args)} failed with exit code {res.returncode}")
    return json.loads((out / "summary.json").read_text())


def run_all(runs: dict[Any, Sequence[str]], jobs: int = 1) -> dict[Any, dict[str, Any]]:
    """:func:`run_training` for every ``name -> ARGS``, ``jobs`` at a time; summaries keyed like ``runs``.

    With ``jobs > 1`` each run gets ``cpu_count // jobs`` intra-op threads, so runs sharing a CPU
    compare at equal threads instead of fighting over all cores, and its own progress-bar line.
    """
    if jobs <= 1:
        return {name: run_training(args) for name, args in runs.items()}

    threads = max(1, (os.cpu_count() or 1) // jobs)
    free = queue.SimpleQueue()  # terminal lines of the progress bars: one per job running
    for line in range(jobs):
        free.put(line)

    def on_a_line(args: Sequence[str]) -> dict[str, Any]:
        line = free.get()
        try:
            return run_training(args, threads, line=line)
        finally:
            free.put(line)

    with ThreadPoolExecutor(jobs) as pool:
        futures = {name: pool.submit(on_a_line, args) for name, args in runs.items()}
        return {name: f.result() for name, f in futures.items()}
