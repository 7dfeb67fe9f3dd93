"""The build layer of the fused CPU kernels (:mod:`mita.ops.cpu.build`, :mod:`mita.ops.cpu.kernel_cache`):
target flags, the cache key, the private cache, verified libraries, the build lock, remembered failures,
and a first call under ``torch.compile``.

Most tests replace the compiler (``cpp_extension.load``) and the loader by fakes, so they run in
milliseconds and load nothing twice; the slow ones run real builds in fresh processes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from mita.ops.cpu import build, kernel_cache

needs_tools = pytest.mark.skipif(build._missing_tools() is not None, reason="no C++ compiler or ninja")
ROOT = Path(__file__).resolve().parents[2]


class FakeToolchain:
    """``cpp_extension.load`` writes a fake library (or raises ``error``); loading records the path."""

    def __init__(self, monkeypatch, cache: Path):
        self.compiled: list[str] = []
        self.loaded: list[str] = []
        self.error: BaseException | None = None
        monkeypatch.setenv("MITA_CACHE", str(cache))
        monkeypatch.delenv("MITA_CPU_REBUILD", raising=False)
        monkeypatch.setattr(build, "_missing_tools", lambda: None)
        monkeypatch.setattr(build, "_registered", lambda lib, probe: bool(self.loaded))
        monkeypatch.setattr(cpp_extension, "load", self.load)
        monkeypatch.setattr(torch.ops, "load_library", self.loaded.append)
        monkeypatch.setattr(build, "_loaded", {})  # fake loads leave the record of the real one alone

    def load(self, *, name, build_directory, **kwargs):
        self.compiled.append(name)
        if self.error is not None:
            raise self.error
        (Path(build_directory) / f"{name}.so").write_bytes(b"\x7fELF library " + name.encode())
        self.loaded.append(str(Path(build_directory) / f"{name}.so"))  # load() also loads

    def so(self) -> Path:
        key = build.build_key("mita_cpu")
        return build.cache_root() / "cpu_kernel" / key / f"mita_cpu_{key}.so"


@pytest.fixture
def fake(fresh_state, tmp_path):
    return FakeToolchain(fresh_state, tmp_path / "cache")


# --- target flags and the key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "march", "expected", "absent"),
    [
        ("x86_64", None, ["-march=native", "-mprefer-vector-width=512"], []),
        ("x86_64", "x86-64-v3", ["-march=x86-64-v3"], ["-march=native"]),
        ("x86_64", "x86-64", ["-march=x86-64"], ["-march=native"]),
        ("aarch64", None, ["-mcpu=native"], ["-march=native", "-mprefer-vector-width=512"]),
        ("riscv64", None, [], ["-march=native", "-mcpu=native", "-mprefer-vector-width=512"]),
        ("aarch64", "armv8.2-a", ["-march=armv8.2-a"], ["-mprefer-vector-width=512"]),
        ("x86_64", "none", [], ["-march=native", "-mprefer-vector-width=512"]),
    ],
)
def test_target_flags_follow_the_machine_and_mita_cpu_march(monkeypatch, machine, march, expected, absent):
    monkeypatch.setattr(build.platform, "machine", lambda: machine)
    monkeypatch.delenv("MITA_CPU_SANITIZE", raising=False)
    if march is None:
        monkeypatch.delenv("MITA_CPU_MARCH", raising=False)
    else:
        monkeypatch.setenv("MITA_CPU_MARCH", march)
    flags = build.cflags()
    assert flags[0] == "-O3" and "-fopenmp" in flags
    assert all(f in flags for f in expected) and not any(f in flags for f in absent)


def test_march_and_sanitizers_are_part_of_the_key(monkeypatch):
    monkeypatch.delenv("MITA_CPU_MARCH", raising=False)
    monkeypatch.delenv("MITA_CPU_SANITIZE", raising=False)
    keys = {build.build_key()}
    for march in ("x86-64-v3", "x86-64"):
        monkeypatch.setenv("MITA_CPU_MARCH", march)
        keys.add(build.build_key())
    monkeypatch.setenv("MITA_CPU_SANITIZE", "1")
    flags = build.cflags()
    assert "-fsanitize=address,undefined" in flags and "-O1" in flags and "-O3" not in flags
    assert "-fno-omit-frame-pointer" in flags and "-g" in flags
    assert "-fsanitize=address,undefined" in build.ldflags()
    keys.add(build.build_key())
    monkeypatch.setenv("MITA_CPU_SANITIZE", "undefined")
    assert "-fsanitize=undefined" in build.cflags()
    keys.add(build.build_key())
    assert len(keys) == 5


def test_bad_march_or_sanitizer_is_refused_with_its_name(fake, monkeypatch):
    monkeypatch.setenv("MITA_CPU_MARCH", "native -fplugin=evil.so")
    assert build.availability() == (
        False,
        "MITA_CPU_MARCH='native -fplugin=evil.so' is not a CPU name such as native, x86-64-v3 or x86-64",
    )
    build.reset_for_tests()
    monkeypatch.delenv("MITA_CPU_MARCH")
    monkeypatch.setenv("MITA_CPU_SANITIZE", "address,thread")
    ok, why = build.availability()
    assert not ok and "unknown sanitizer 'thread'" in why and not fake.compiled


def test_sanitizer_build_needs_its_runtime_preloaded(fake, monkeypatch):
    """Loading an AddressSanitizer library into a process without the runtime would abort it."""
    monkeypatch.setenv("MITA_CPU_SANITIZE", "1")
    ok, why = build.availability()
    assert not ok and "needs the sanitizer runtime preloaded: LD_PRELOAD=" in why
    assert not fake.compiled and not fake.loaded


# --- first build, verified loads, truncated libraries -------------------------------------------------


def test_first_build_says_so_installs_privately_and_records_the_hash(fake, capfd):
    assert build.availability() == (True, "")
    err = capfd.readouterr().err
    said = f"mita: compiling the fused CPU kernel mita_cpu once (about 20-50 s; cached in {fake.so().parent})"
    assert said in err
    so = fake.so()
    record = json.loads(so.with_suffix(".json").read_text())
    assert record["sha256"] == kernel_cache.sha256(so) and record["size"] == so.stat().st_size
    for d in (so.parent, so.parent.parent):
        assert d.stat().st_mode & 0o777 == 0o700
    assert not [p for p in so.parent.iterdir() if p.name.startswith("scratch")]  # scratch removed
    assert fake.compiled == [so.stem]
    # A new process (state forgotten, nothing loaded) loads the verified library without compiling.
    build.reset_for_tests()
    fake.loaded.clear()
    assert build.availability() == (True, "")
    assert fake.loaded == [str(so)] and len(fake.compiled) == 1
    assert "compiling" not in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "no record", "other bytes", "record edited"])
def test_a_library_that_does_not_match_its_record_is_never_loaded_and_is_rebuilt(fake, damage):
    assert build.availability()[0]
    so, record = fake.so(), fake.so().with_suffix(".json")
    if damage == "truncated":  # a build killed mid-link
        so.write_bytes(so.read_bytes()[:5])
    elif damage == "no record":  # killed between the rename and the record
        record.unlink()
    elif damage == "other bytes":  # same size, other content
        so.write_bytes(so.read_bytes()[::-1])
    else:
        record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    build.reset_for_tests()
    fake.loaded.clear()
    assert build.availability() == (True, "")
    assert len(fake.compiled) == 2 and str(so) not in fake.loaded  # rebuilt, the damaged file never loaded
    assert kernel_cache.verified(so)


# --- a private cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cpu_kernel", "key"])
def test_a_cache_others_can_write_is_refused(fake, which):
    assert build.availability()[0]
    target = fake.so().parent if which == "key" else fake.so().parent.parent
    target.chmod(0o777)
    build.reset_for_tests()
    fake.loaded.clear()
    with pytest.warns(UserWarning, match="writable by other users"):
        ok, why = build.availability()
        build.warn_fallback_once(why)
    assert not ok and f"{target} is writable by other users (mode 0o777)" in why
    assert not fake.loaded and len(fake.compiled) == 1


def test_a_cache_owned_by_another_user_is_refused(fake, monkeypatch):
    assert build.availability()[0]
    build.reset_for_tests()
    fake.loaded.clear()
    monkeypatch.setattr(os, "getuid", lambda: 4242)  # the cache now belongs to "someone else"
    ok, why = build.availability()
    assert not ok and "belongs to another user (uid" in why and "set MITA_CACHE" in why
    assert not fake.loaded


def test_a_library_others_can_write_is_not_loaded(fake):
    assert build.availability()[0]
    fake.so().chmod(0o777)
    assert not kernel_cache.verified(fake.so())


def test_a_shared_parent_without_sticky_bit_is_refused(fake, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename cpu_kernel away and put their own in its place
    monkeypatch.setenv("MITA_CACHE", str(shared))
    ok, why = build.availability()
    assert not ok and f"{shared} is writable by other users" in why
    build.reset_for_tests()
    shared.chmod(0o1777)  # sticky, as /tmp: only the owner may rename its entries
    assert build.availability() == (True, "")


# --- no tool chain, failures ---------------------------------------------------------------------------


def test_a_cached_kernel_is_used_without_compiler_or_ninja(fake, monkeypatch):
    assert build.availability()[0]
    build.reset_for_tests()
    fake.loaded.clear()
    monkeypatch.setattr(build, "_missing_tools", lambda: "no C++ compiler ('c++' not found)")
    assert build.availability() == (True, "")
    assert fake.loaded == [str(fake.so())]


def test_no_cache_and_no_compiler_says_so(fake, monkeypatch):
    monkeypatch.setattr(build, "_missing_tools", lambda: "no C++ compiler ('c++' not found)")
    assert build.availability() == (False, "no C++ compiler ('c++' not found)")
    assert not (fake.so().parent / "failed.json").exists()  # installing a compiler is enough


NINJA_ENOSPC = """Error building extension 'mita_cpu_x': [1/2] c++ -MMD -MF kernel.o.d ...
[2/2] c++ kernel.o -shared -fopenmp -o mita_cpu_x.so
FAILED: mita_cpu_x.so
/usr/bin/ld: final link failed: No space left on device
collect2: error: ld returned 1 exit status
ninja: build stopped: subcommand failed."""


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (RuntimeError(NINJA_ENOSPC), "/usr/bin/ld: final link failed: No space left on device"),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/c/x.so"), "No space left on device: /c/x.so"),
        (
            RuntimeError("Error building extension\nkernel.cpp:7:3: error: 'foo' was not declared\nstopped"),
            "kernel.cpp:7:3: error: 'foo' was not declared",
        ),
    ],
)
def test_a_failed_build_says_why_and_is_remembered(fake, monkeypatch, error, why):
    fake.error = error
    assert build.availability() == (False, f"building the CPU kernel failed: {why}")
    marker = fake.so().parent / "failed.json"
    assert json.loads(marker.read_text())["why"] == f"building the CPU kernel failed: {why}"
    # A new process does not compile again ...
    build.reset_for_tests()
    ok, remembered = build.availability()
    assert not ok and remembered.startswith(f"building the CPU kernel failed: {why} (remembered")
    assert "MITA_CPU_REBUILD=1 retries" in remembered and len(fake.compiled) == 1
    # ... unless asked to, or a day later; a success forgets the failure.
    build.reset_for_tests()
    monkeypatch.setenv("MITA_CPU_REBUILD", "1")
    assert not build.availability()[0] and len(fake.compiled) == 2
    monkeypatch.delenv("MITA_CPU_REBUILD")
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "time": record["time"] - kernel_cache.RETRY_FAILED_S - 1}))
    build.reset_for_tests()
    fake.error = None
    assert build.availability() == (True, "") and len(fake.compiled) == 3
    assert not marker.exists()


# --- the build lock ------------------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, str(os.getpid()).encode(), 0)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    cmd = [sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_build_waits_for_a_live_builder_and_says_so(fake, capfd):
    build_dir = kernel_cache.private_dir(fake.so().parent)
    holder = _hold_lock(build_dir / "build.lock", 1.5)
    start = time.monotonic()
    assert build.availability() == (True, "")
    assert time.monotonic() - start >= 1.0  # waited for the holder
    holder.wait(5)
    err = capfd.readouterr().err
    assert f"waiting for another process building the mita CPU kernel mita_cpu (pid {holder.pid})" in err


def test_a_lock_left_by_a_killed_builder_blocks_nobody(fake):
    """The holder dies (SIGKILL) with the lock held, the lock file and a half-done scratch folder left
    behind, a leftover .so without its record too: the next build neither waits nor loads the leftover."""
    build_dir = kernel_cache.private_dir(fake.so().parent)
    holder = _hold_lock(build_dir / "build.lock", 600)
    (build_dir / f"scratch-{holder.pid}").mkdir()
    (build_dir / "lock").touch()  # cpp_extension's own baton, as a killed cpp_extension.load leaves it
    fake.so().write_bytes(b"half written")
    holder.send_signal(signal.SIGKILL)
    holder.wait(5)
    start = time.monotonic()
    assert build.availability() == (True, "")
    assert time.monotonic() - start < 5
    assert fake.compiled and str(fake.so()) not in fake.loaded and kernel_cache.verified(fake.so())
    assert not list(build_dir.glob("scratch-*"))


# --- real builds in fresh processes --------------------------------------------------------------------

AVAILABLE = """
import torch
from mita import mita_attention
from mita.ops.cpu import build
ok, why = build.availability()
print("available", ok, why, flush=True)
if ok:
    q, k, v, r = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(4))
    a = mita_attention(q, k, v, r[:, :, :5], topk=8, backend="cpu")
    b = mita_attention(q, k, v, r[:, :, :5], topk=8, backend="reference")
    print("agrees", torch.allclose(a, b, atol=1e-10), flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)  # the same MITA_CPU_* settings, hence the same build key, as this process
    env.update(PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(script: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", script]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@needs_tools
def test_a_cached_kernel_loads_in_a_process_without_compiler_or_ninja(tmp_path):
    assert build.availability()[0]  # built (or found) in this process's cache
    # that cache: MITA_CACHE may have changed since this process loaded the kernel (session fixtures)
    loaded = build.loaded_from("mita_cpu")
    assert loaded is not None and loaded.is_file(), loaded
    root = loaded.parents[2]
    bare = tmp_path / "bin"  # a PATH with python only: no c++, no ninja
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    env = _env(PATH=str(bare), CXX=str(tmp_path / "no-c++"), MITA_CACHE=str(root))
    run = _run(AVAILABLE, env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "available True" in run.stdout and "agrees True" in run.stdout, run.stdout + run.stderr[-2000:]
    assert "compiling" not in run.stderr


@pytest.mark.slow
@needs_tools
def test_a_truncated_library_and_a_build_killed_midway_neither_crash_nor_hang(tmp_path):
    """This process's cached build, copied and truncated (as by a link killed midway): a new process does
    not load it but rebuilds, and is killed (with its compiler) during that build. The next process
    rebuilds within bounded time and works."""
    assert build.availability()[0]
    key = build.build_key("mita_cpu")
    mine = build.loaded_from("mita_cpu").parent  # where this process found it, whatever MITA_CACHE says now
    copy = kernel_cache.private_dir(kernel_cache.private_dir(tmp_path / "cache" / "cpu_kernel") / key)
    for name in (f"mita_cpu_{key}.so", f"mita_cpu_{key}.json"):
        (copy / name).write_bytes((mine / name).read_bytes())
    so = copy / f"mita_cpu_{key}.so"
    assert kernel_cache.verified(so)
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    env = _env(MITA_CACHE=str(tmp_path / "cache"))
    first = subprocess.Popen(
        [sys.executable, "-c", AVAILABLE], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for line in first.stderr:  # the one line a first build prints
        if "mita: compiling the fused CPU kernel mita_cpu once" in line:
            break
    else:
        pytest.fail(f"the first process did not rebuild the truncated library (exit {first.wait()})")
    time.sleep(2)  # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    start = time.monotonic()
    second = _run(AVAILABLE, env, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "available True" in second.stdout and "agrees True" in second.stdout, second.stdout
    assert second.stderr.count("compiling the fused CPU kernel") == 1
    assert "waiting for another process" not in second.stderr
    assert kernel_cache.verified(so), f"rebuilt in {time.monotonic() - start:.0f} s but not recorded"


COLD_COMPILE = """
import torch
from mita import mita_attention
from mita.landmarks import pool_1d
q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
def fn(q, k, v):
    return mita_attention(q, k, v, pool_1d(q, 8), topk=8, backend="auto")
out = torch.compile(fn, fullgraph=True)(q, k, v)
torch.testing.assert_close(out, fn(q, k, v))
from mita.ops.cpu import build
print("kernel", build.availability(), flush=True)
"""


@pytest.mark.slow
@needs_tools
def test_torch_compile_fullgraph_as_the_first_call_of_a_process():
    assert build.availability()[0]  # the cache is warm: the fresh process only has to load it
    run = _run(COLD_COMPILE, _env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kernel (True, '')" in run.stdout
