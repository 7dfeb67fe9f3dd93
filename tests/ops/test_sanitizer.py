"""The kernels under AddressSanitizer and UndefinedBehaviorSanitizer, and the inputs that once made them
read out of bounds.

The reproducers (a NaN query, non-causal and causal) run in the ordinary suite too, where an
out-of-bounds read may pass unnoticed by luck of memory layout; under the sanitizers (the slow test,
``MITA_CPU_SANITIZE=1`` in a fresh process with the runtime preloaded) any such access fails the run,
with the kernel test files run alongside."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from mita import mita_attention, mita_causal_attention
from mita.landmarks import block_mean, pool_1d
from mita.ops.cpu import build

from .kernel_builds import KERNEL_TESTS, build_all, env_for, run_pytest

needs_tools = pytest.mark.skipif(build._missing_tools() is not None, reason="no C++ compiler or ninja")
NAN = float("nan")


@needs_tools
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_nan_query_is_routed_in_bounds_as_the_reference_routes_it(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g, dtype=dtype) for _ in range(3))
    q[0, 0, 5, 0] = NAN  # landmark 0 (the mean of its block) is NaN too
    r = pool_1d(q, 16)
    out, routing = mita_attention(q, k, v, r, topk=16, backend="cpu", return_routing=True)
    _, want = mita_attention(q, k, v, r, topk=16, backend="reference", return_routing=True)
    ei = routing.expert_index
    assert ((ei >= 0) & (ei < r.shape[2])).all(), ei.unique()
    assert torch.equal(ei, want.expert_index)


@needs_tools
def test_a_nan_query_after_the_first_block_is_routed_to_a_visible_landmark():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 48, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bs = 8
    q[0, 1, 21, 3] = NAN  # in block 2: landmarks 0 and 1 are visible, 2 (its own block, NaN) is not
    kw = dict(topk=8, block_size=bs, landmark_horizon="frozen", return_routing=True)
    _, routing = mita_causal_attention(q, k, v, block_mean(q, bs), backend="cpu", **kw)
    _, want = mita_causal_attention(q, k, v, block_mean(q, bs), backend="torch", **kw)
    ei = routing.expert_index
    position = torch.arange(48).view(1, 1, 48, 1)
    visible = ei < position // bs  # a landmark of an earlier, completed block ...
    assert (visible | (ei == -1) & (position < bs)).all(), ei[0, 1, 21]  # ... or none in block 0
    assert torch.equal(ei, want.expert_index)


def _runtime(name: str) -> str | None:
    """The sanitizer runtime ``name`` (e.g. ``libasan.so``) of the C++ compiler, None if it has none."""
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
        path = found.stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


@pytest.mark.slow
@needs_tools
def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    runtimes = [_runtime("libasan.so"), _runtime("libubsan.so")]
    if None in runtimes:
        pytest.skip("the C++ compiler has no AddressSanitizer / UBSan runtime (libasan, libubsan)")
    env = env_for(
        tmp_path / "cache",
        MITA_CPU_SANITIZE="address,undefined",
        LD_PRELOAD=" ".join(runtimes),
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0",  # the interpreter's own leaks
        UBSAN_OPTIONS="halt_on_error=0:print_stacktrace=1",  # report every finding, then fail below
    )
    seconds = build_all(env)
    run = run_pytest([__file__, *KERNEL_TESTS], env)  # this file: the NaN reproducers (not slow)
    output = run.stdout + run.stderr
    found = next((s for s in SANITIZER_REPORTS if s in output), None)
    start = output.find(found) if found else len(output) - 4000
    assert found is None and run.returncode == 0, (
        f"under sanitizers (built in {seconds:.0f} s), exit {run.returncode}: "
        f"{output[max(0, start - 300) :][:5000]}"
    )
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
