"""Build the fused CPU kernels on first use and cache them; say why when one cannot be built.

Each library in :data:`LIBRARIES` (its op namespace -> its source, all sharing ``kernel_common.h``) is
compiled with ``torch.utils.cpp_extension`` (needs a C++ compiler and ``ninja``) into
``$MITA_CACHE/cpu_kernel/<key>`` (default ``~/.cache/mita``), where the key hashes the source and the
shared header, the torch version, the compiler flags and this CPU's model and feature flags. Later
processes load the cached library in well under a second, with or without a compiler on ``PATH``.
Libraries are built and loaded one by one, so one that fails to build leaves the others usable.

Environment:

- ``MITA_CPU_KERNEL=0`` turns the kernels off (``backend="auto"`` then uses the torch backend).
- ``MITA_CPU_MARCH``: the target CPU, ``native`` (default: this machine) or a compiler name such as
  ``x86-64-v3`` (AVX2) or ``x86-64`` (baseline x86, SSE2); ``none`` passes no target flag. On x86 it is
  passed as ``-march``; elsewhere ``native`` becomes ``-mcpu=native`` (Arm, POWER) or nothing.
- ``MITA_CPU_SANITIZE=1`` (or a list such as ``address,undefined``) builds with AddressSanitizer and
  UndefinedBehaviorSanitizer, for tests: the process must have the sanitizer runtime preloaded
  (``LD_PRELOAD=$(c++ -print-file-name=libasan.so)``), else the kernels are reported unavailable.
- ``MITA_CPU_REBUILD=1`` retries a build that failed (a failure is remembered for a day, so that
  every new process does not pay for the same failing compile).

The cache (see :mod:`.kernel_cache`) is private: a directory another user could write is refused, a
library is installed by one rename once complete and loaded only if it matches its recorded sha256.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from . import kernel_cache

HERE = Path(__file__).parent
LIBRARIES = {  # op namespace (torch.ops.<name>) -> source file
    "mita_cpu": "kernel.cpp",
    "mita_cpu_causal": "causal_kernel.cpp",
}
PROBES = {"mita_cpu": "split_fwd", "mita_cpu_causal": "fwd"}  # an op each library registers
HEADERS = ("kernel_common.h",)
COMMON_CFLAGS = ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
ENV_SWITCH = "MITA_CPU_KERNEL"
ENV_MARCH = "MITA_CPU_MARCH"
ENV_SANITIZE = "MITA_CPU_SANITIZE"
ENV_REBUILD = "MITA_CPU_REBUILD"
CACHE_LAYOUT = "2"  # bump when the cache's files change meaning
SANITIZERS = ("address", "undefined")
_FALSE = ("0", "false", "no", "off", "")

_state: dict[str, object] = {}  # per library: (ok, why), set once per process; "warned"
_loaded: dict[str, Path] = {}  # per library: the file this process loaded it from


class KernelUnavailable(RuntimeError):
    """A library cannot be used here; ``str(err)`` is the complete reason."""


def cache_root() -> Path:
    """``$MITA_CACHE`` or ``~/.cache/mita``."""
    return Path(os.environ.get("MITA_CACHE") or Path.home() / ".cache" / "mita")


def is_x86() -> bool:
    """Whether this machine is an x86 (the kernels' AVX-512 / AVX2 paths and flags apply)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def target_march() -> str:
    """``$MITA_CPU_MARCH`` (default ``native``), checked to be one compiler word."""
    march = os.environ.get(ENV_MARCH, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", march):
        raise KernelUnavailable(
            f"{ENV_MARCH}={march!r} is not a CPU name such as native, x86-64-v3 or x86-64"
        )
    return march


def sanitizers() -> tuple[str, ...]:
    """The sanitizers ``$MITA_CPU_SANITIZE`` asks for (``1``: address and undefined)."""
    value = os.environ.get(ENV_SANITIZE, "").strip().lower()
    if value in _FALSE:
        return ()
    if value in ("1", "true", "yes", "on"):
        return SANITIZERS
    chosen = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SANITIZERS]
    if unknown:
        raise KernelUnavailable(
            f"{ENV_SANITIZE}={value!r}: unknown sanitizer {unknown[0]!r} (use address,undefined)"
        )
    return chosen


def arch_flags(march: str) -> list[str]:
    """The target flags for ``march`` on this machine: x86-only flags only on x86."""
    if march == "none":
        return []
    if is_x86():
        return [f"-march={march}", "-mprefer-vector-width=512"]  # 512 matters only where AVX-512 is
    if march == "native":
        machine = platform.machine().lower()
        return ["-mcpu=native"] if machine.startswith(("aarch64", "arm", "ppc", "powerpc")) else []
    return [f"-march={march}"]


def cflags() -> list[str]:
    """The compiler flags of this build: optimisation (or sanitizers), target CPU, OpenMP, math."""
    chosen = sanitizers()
    if chosen:
        opt = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={','.join(chosen)}"]
    else:
        opt = ["-O3"]
    return opt + arch_flags(target_march()) + COMMON_CFLAGS


def ldflags() -> list[str]:
    chosen = sanitizers()
    return ["-fopenmp"] + ([f"-fsanitize={','.join(chosen)}"] if chosen else [])


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
    flags = " ".join(cflags() + ["|"] + ldflags())
    for part in (CACHE_LAYOUT, torch.__version__, flags, platform.machine(), _cpu_signature()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _missing_tools() -> str | None:
    from torch.utils import cpp_extension  # noqa: PLC0415 - heavy (setuptools), only where a build may run

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


def _sanitizer_runtime_missing() -> str | None:
    """Why a sanitizer build cannot be loaded into this process (its runtime must come first)."""
    if "address" not in sanitizers():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "libasan" in maps:
        return None
    return (
        f"{ENV_SANITIZE} needs the sanitizer runtime preloaded: "
        "LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0"
    )


_OS_ERRORS = tuple(
    os.strerror(e) for e in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOMEM, errno.EIO)
)


def failure_reason(err: BaseException) -> str:
    """The line that says why a build failed: an operating-system error (a full disk, say) by its own
    message, else the compiler's first ``error:`` line, else the last line of the message."""
    chain, seen = [], err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    lines = [ln.strip() for e in chain for ln in str(e).splitlines() if ln.strip()] or [type(err).__name__]
    for test in (
        lambda ln: any(msg in ln for msg in _OS_ERRORS),
        lambda ln: "error:" in ln and "ld returned" not in ln,
        lambda ln: "undefined reference" in ln or "error:" in ln,
        lambda ln: "error" in ln.lower(),
    ):
        found = next((ln for ln in lines if test(ln)), None)
        if found is not None:
            return found[:200]
    return lines[-1][:200]


def _compile(lib: str, key: str, build_dir: Path, so: Path) -> None:
    """Build ``lib`` in a scratch directory beside ``so`` (under the build lock), then install it there.
    The compiled library is loaded by ``cpp_extension.load``."""
    from torch.utils import cpp_extension  # noqa: PLC0415 - heavy (setuptools), only to build

    scratch = build_dir / f"scratch-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    print(
        f"mita: compiling the fused CPU kernel {lib} once (about 20-50 s; cached in {build_dir})",
        file=sys.stderr,
        flush=True,
    )
    env_preload = os.environ.pop("LD_PRELOAD", None)  # the compiler need not run under a sanitizer
    try:
        cpp_extension.load(
            name=f"{lib}_{key}",
            sources=[str(HERE / LIBRARIES[lib])],
            extra_cflags=cflags(),
            extra_ldflags=ldflags(),
            build_directory=str(scratch),
            is_python_module=False,
            verbose=False,
        )
        kernel_cache.install(scratch / so.name, so)
    finally:
        if env_preload is not None:
            os.environ["LD_PRELOAD"] = env_preload
        shutil.rmtree(scratch, ignore_errors=True)


def _build(lib: str) -> None:
    """Load ``lib`` from the cache if a verified build is there, else build it (once: other processes
    wait on the build lock, then load the result)."""
    key = build_key(lib)
    root = cache_root()
    kernels = kernel_cache.private_dir(root / "cpu_kernel", parent_ok=root)
    build_dir = kernel_cache.private_dir(kernels / key)
    so = build_dir / f"{lib}_{key}.so"
    if (why := _sanitizer_runtime_missing()) is not None:
        raise KernelUnavailable(why)
    if kernel_cache.verified(so):  # built before: no compiler or lock needed
        torch.ops.load_library(str(so))
        _loaded[lib] = so
        return
    retry = os.environ.get(ENV_REBUILD, "").strip().lower() not in _FALSE
    if (why := kernel_cache.remembered_failure(build_dir, retry)) is not None:
        raise KernelUnavailable(f"{why} (remembered from an earlier try; {ENV_REBUILD}=1 retries)")
    if (missing := _missing_tools()) is not None:
        raise KernelUnavailable(missing)
    with kernel_cache.build_lock(build_dir, f"the mita CPU kernel {lib}"):
        if kernel_cache.verified(so):  # another process built it while this one waited
            torch.ops.load_library(str(so))
            _loaded[lib] = so
            return
        for stale in build_dir.glob("scratch-*"):  # left by killed builds (this process holds the lock)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            _compile(lib, key, build_dir, so)
        except Exception as err:
            why = f"building the CPU kernel failed: {failure_reason(err)}"
            kernel_cache.remember_failure(build_dir, why)
            raise KernelUnavailable(why) from err
        kernel_cache.forget_failure(build_dir)
        _loaded[lib] = so


def _probe(lib: str, probe: str) -> tuple[bool, str]:
    """Load (building if needed) ``lib``: (True, "") or (False, why)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False, f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    try:
        if not _registered(lib, probe):
            _build(lib)
    except (KernelUnavailable, kernel_cache.UnsafeCacheError) as err:
        return False, str(err)
    except Exception as err:  # noqa: BLE001 - any build failure means: use the torch backend
        return False, f"building the CPU kernel failed: {failure_reason(err)}"
    ok = _registered(lib, probe)
    return ok, "" if ok else f"the built library registered no {lib} ops"


def loaded_from(lib: str = "mita_cpu") -> Path | None:
    """The shared library this process loaded for ``lib`` (its cache entry), or None."""
    return _loaded.get(lib)


def availability(lib: str = "mita_cpu", probe: str | None = None) -> tuple[bool, str]:
    """Whether library ``lib`` is loaded (building it if needed; ``probe`` is one of its ops, by default
    :data:`PROBES`'s), and if not, why. Cached per library.

    Not wrapped in ``torch.compiler.disable``: that imports ``torch._dynamo`` (150 MB of resident memory)
    into every process. Under ``torch.compile`` the cached answer is a plain dict lookup, and a first call
    while compiling runs eagerly through :func:`_cached_or_probe` (a constant for the graph)."""
    probe = probe or PROBES[lib]
    if lib not in _state:
        if torch.compiler.is_compiling():
            return _cached_or_probe(lib, probe)  # run eagerly at trace time, a constant for the graph
        _state[lib] = _probe(lib, probe)
    ok, why = _state[lib]  # type: ignore[misc]
    return bool(ok), str(why)


def _cached_or_probe(lib: str, probe: str) -> tuple[bool, str]:
    """The cached answer for ``lib``, probing (and caching) it if needed.

    When the first MiTA call of a process happens while ``torch.compile`` traces it, this runs eagerly
    at trace time (file system, compiler, loading) and its answer enters the graph as a constant, so
    ``fullgraph=True`` works on a cold start: it carries the mark ``torch.compiler.assume_constant_result``
    sets, set here directly because that function imports ``torch._dynamo`` (150 MB of resident memory)
    into every process, compiling or not."""
    if lib not in _state:
        _state[lib] = _probe(lib, probe)
    ok, why = _state[lib]  # type: ignore[misc]
    return bool(ok), str(why)


_cached_or_probe._dynamo_marked_constant = True  # type: ignore[attr-defined]


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
