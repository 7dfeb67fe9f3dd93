"""Shared by the tests that build the CPU kernels in other configurations (target CPUs, sanitizers):
fresh processes with their own ``$MITA_CACHE``, both libraries built side by side, then a subset of the
kernel test files run against them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mita.ops.cpu import build

ROOT = Path(__file__).resolve().parents[2]
PROBE = "from mita.ops.cpu import build; print(*build.availability({lib!r}), sep='|')"
# The kernel test files, without their torch.compile / opcheck cases (slow, and about the custom-op
# registrations, not the kernels' arithmetic) and without slow tests.
KERNEL_TESTS = [
    "tests/ops/test_cpu_paths.py",
    "tests/ops/test_causal_cpu.py",
    "tests/ops/test_cpu_backend.py",
    "tests/ops/test_nonfinite.py",
    "tests/ops/test_fuzz.py",  # with MITA_FUZZ_EXAMPLES (below): fewer examples in these builds
    "-m",
    "not slow",
    "-k",
    "not compile and not opcheck",
]


def env_for(cache: Path, **extra: str) -> dict[str, str]:
    """This process's environment with its own kernel cache, one thread and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MITA_CPU")}
    env.update(
        MITA_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        MITA_FUZZ_EXAMPLES="30",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p),
    )
    env.update(extra)
    return env


def build_all(env: dict[str, str], timeout: float = 900) -> float:
    """Build (and load) every library in its own process, side by side; the seconds it took. Raises
    ``AssertionError`` with the reason when one is unavailable."""
    start = time.monotonic()
    procs = {
        lib: subprocess.Popen(
            [sys.executable, "-c", PROBE.format(lib=lib)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lib in build.LIBRARIES
    }
    for lib, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0 and out.startswith("True|"), f"{lib}: {out.strip()} {err[-3000:]}"
    return time.monotonic() - start


def run_pytest(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m pytest -q -s ARGS`` in a fresh process (``-s``: a sanitizer's report reaches stderr
    even when it aborts the process)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def built_libraries(cache: Path) -> list[Path]:
    """The verified libraries under ``cache``."""
    return sorted((cache / "cpu_kernel").glob("*/*.so"))
