"""The kernels built for other x86 targets than this machine: AVX2 (``x86-64-v3``) and the x86-64 baseline
(SSE2), which take the generic (non-AVX-512) code paths, run the kernel test files in fresh processes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mita.ops.cpu import build

from .kernel_builds import KERNEL_TESTS, build_all, built_libraries, env_for, run_pytest

# The widest vector register each target may use: a wider one in the library means the flag was ignored.
TOO_WIDE = {"x86-64-v3": "%zmm", "x86-64": "%ymm"}


@pytest.mark.slow
@pytest.mark.skipif(build._missing_tools() is not None, reason="no C++ compiler or ninja")
@pytest.mark.skipif(not build.is_x86(), reason="x86 targets (x86-64-v3, x86-64) are tested on x86 only")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_kernel_tests_pass_when_built_for(march, tmp_path):
    env = env_for(tmp_path / "cache", MITA_CPU_MARCH=march)
    seconds = build_all(env)
    libraries = built_libraries(tmp_path / "cache")
    assert len(libraries) == len(build.LIBRARIES)
    if shutil.which("objdump"):
        for lib in libraries:
            code = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True)
            assert TOO_WIDE[march] not in code.stdout, (
                f"{lib.name} ({march}) uses {TOO_WIDE[march]} registers"
            )
    run = run_pytest(KERNEL_TESTS, env)
    summary = run.stdout.strip().splitlines()[-1:]
    assert run.returncode == 0, (
        f"{march} (built in {seconds:.0f} s): {run.stdout[-4000:]} {run.stderr[-2000:]}"
    )
    assert " passed" in summary[0] and "skipped" not in summary[0], summary
