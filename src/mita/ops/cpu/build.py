"""Build the fused CPU kernels on first use and cache them; say why when one cannot be built.

Each library in :data:`LIBRARIES` (its op namespace -> its source, all sharing ``kernel_common.h``) is
compiled with ``torch.utils.cpp_extension`` (needs a C++ compiler and ``ninja``) into
``$MITA_CACHE/cpu_kernel/<key>`` (default ``~/.cache/mita``), where the key hashes the source and the
shared header, the torch version, the compiler flags and this CPU's model and feature flags (the build
uses ``-march=native``). Later processes load the cached library in well under a second. Libraries are built
and loaded one by one, so one that fails to build leaves the others usable. ``MITA_CPU_KERNEL=0`` turns
them all off (``backend="auto"`` then uses the torch backend).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
LIBRARIES = {  # op namespace (torch.ops.<name>) -> source file
    "mita_cpu": "kernel.cpp",
    "mita_cpu_causal": "causal_kernel.cpp",
}
HEADERS = ("kernel_common.h",)
CFLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
]
ENV_SWITCH = "MITA_CPU_KERNEL"
STALE_LOCK_S = 600  # a build lock older than this belongs to a killed build

_state: dict[str, object] = {}  # per library: (ok, why), set once per process; "warned"


def cache_root() -> Path:
    """``$MITA_CACHE`` or ``~/.cache/mita``."""
    return Path(os.environ.get("MITA_CACHE") or Path.home() / ".cache" / "mita")


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.machine()


def build_key(lib: str = "mita_cpu") -> str:
    """16 hex digits naming one build of ``lib``: source, headers, torch, flags and CPU."""
    h = hashlib.sha256((HERE / LIBRARIES[lib]).read_bytes())
    for header in HEADERS:
        h.update((HERE / header).read_bytes())
    for part in (torch.__version__, " ".join(CFLAGS), _cpu_signature()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _missing_tools() -> str | None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _registered(lib: str, probe: str) -> bool:
    """Whether this process already has ``lib``'s ops. Then nothing is loaded again: a second copy of the
    library (e.g. the same build cached under another ``$MITA_CACHE``) would register the namespace twice,
    which aborts the process."""
    return hasattr(getattr(torch.ops, lib), probe)


def _build(lib: str) -> None:
    from torch.utils import cpp_extension

    key = build_key(lib)
    build_dir = cache_root() / "cpu_kernel" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / f"{lib}_{key}.so"
    lock = build_dir / "lock"  # cpp_extension's baton: held while a process builds into build_dir
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # left by a build that was killed: it would make every load wait
    if so.exists() and not lock.exists():  # built before: load it without importing the tool chain
        torch.ops.load_library(str(so))
        return
    # Not built, or another process is still writing the library: load() waits for its baton, then
    # builds (or finds the build up to date) and loads; a half-written .so is never loaded.
    cpp_extension.load(
        name=f"{lib}_{key}",
        sources=[str(HERE / LIBRARIES[lib])],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def availability(lib: str = "mita_cpu", probe: str = "fwd") -> tuple[bool, str]:
    """Whether library ``lib`` is loaded (building it if needed; ``probe`` is one of its ops), and if not,
    why. Cached per library.

    Not wrapped in ``torch.compiler.disable``: that imports ``torch._dynamo`` (150 MB of resident memory)
    into every process; under ``torch.compile`` the cached answer is a plain dict lookup."""
    if lib not in _state:
        ok, why = False, ""
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            why = f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
        elif (missing := _missing_tools()) is not None:
            why = missing
        else:
            try:
                if not _registered(lib, probe):
                    _build(lib)
                ok = _registered(lib, probe)
                why = "" if ok else "the built library registered no mita_cpu ops"
            except Exception as err:  # noqa: BLE001 - any build failure means: use the torch backend
                lines = str(err).strip().splitlines() or [type(err).__name__]
                # The compiler's own "error:" line says most; else the first line that mentions one.
                first_error = next((ln for ln in lines if "error:" in ln), None) or next(
                    (ln for ln in lines if "error" in ln.lower()), lines[-1]
                )
                why = f"building the CPU kernel failed: {first_error.strip()[:200]}"
        _state[lib] = (ok, why)
    ok, why = _state[lib]  # type: ignore[misc]
    return bool(ok), str(why)


def warn_fallback_once(why: str) -> None:
    """One warning per process when ``backend="auto"`` falls back to the torch backend for a reason the
    user did not choose (a deliberate ``MITA_CPU_KERNEL=0`` stays silent)."""
    if _state.get("warned") or why.startswith("disabled by"):
        return
    _state["warned"] = True
    warnings.warn(f"mita: fused CPU kernel unavailable ({why}); using the torch backend", stacklevel=3)


def reset_for_tests() -> None:
    """Forget the cached availability (tests that force the fallback)."""
    _state.clear()
