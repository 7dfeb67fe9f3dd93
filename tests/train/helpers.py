"""Shared settings for the training tests: a tiny ListOps configuration (generated, no files needed)."""

import os
import subprocess
import sys

# 48 training sequences of 64 tokens, batches of 8 -> 6 steps per epoch; 16 test sequences.
TINY = [
    "--task", "listops", "--preset", "tiny", "--data-arg", "seq_len=64", "--train-size", "48",
    "--test-size", "16", "--batch-size", "8", "--no-progress",
]  # fmt: skip


def run_mita(args: list[str], env: dict | None = None, launcher: list[str] | None = None):
    """Run ``python -m mita train ARGS`` (or ``launcher + ARGS``) in a fresh process; capture its output."""
    cmd = (launcher or [sys.executable, "-m", "mita", "train"]) + args
    # One thread, and MKL's strict conditional reproducibility: results must not depend on how the
    # allocator happened to align a buffer, or two identical runs could differ by an ulp.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)
