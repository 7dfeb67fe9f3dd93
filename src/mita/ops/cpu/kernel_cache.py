"""The on-disk cache of the built CPU kernels: safe directories, a build lock, verified libraries and
remembered failures.

Layout of one build (``<dir>`` is ``$MITA_CACHE/cpu_kernel/<key>``)::

    <dir>/<name>.so         the library, moved into place by one rename once it is complete
    <dir>/<name>.json       its record: size and sha256; a library is loaded only if it matches
    <dir>/failed.json       why the last build failed and when (retried after RETRY_FAILED_S)
    <dir>/build.lock        an advisory lock (flock) held while a process builds; the kernel
                            releases it when that process dies, so a killed build blocks nobody

Directories are created private (0o700); one that another user owns, or that others may write, is
refused: whoever can write there could make every mita process run their code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): the kernels are not built there, availability() says why
    fcntl = None

RETRY_FAILED_S = 24 * 3600  # a remembered build failure is retried after a day (or with MITA_CPU_REBUILD=1)
LOCK_WAIT_S = 1800  # give up waiting for another process's build after this long
POLL_S = 0.2


class UnsafeCacheError(RuntimeError):
    """The cache directory could be written by someone else."""


def _check_private(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid != os.getuid():
        raise UnsafeCacheError(
            f"the kernel cache {what} {path} belongs to another user (uid {st.st_uid}); "
            "set MITA_CACHE to a directory of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(
            f"the kernel cache {what} {path} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):#o}); "
            f"run chmod go-w {path} or set MITA_CACHE to a private directory"
        )


def private_dir(path: Path, parent_ok: Path | None = None) -> Path:
    """``path`` as a directory only its owner (this user) can write, created with mode 0o700 if missing.

    Raises :class:`UnsafeCacheError` when it, or ``parent_ok`` (the directory holding it), could be
    changed by another user: another user's ``parent_ok`` is accepted only if root owns it, or it is
    sticky (as ``/tmp``), so nobody else can rename ``path`` away."""
    if parent_ok is not None and parent_ok.exists():
        st = parent_ok.stat()
        foreign = st.st_uid not in (os.getuid(), 0)
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if foreign or shared:
            _check_private(parent_ok, st, "directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheError(f"the kernel cache directory {path} is not a directory")
    _check_private(path, st, "directory")
    return path


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and one rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_path(so: Path) -> Path:
    return so.with_suffix(".json")


def install(built: Path, so: Path) -> None:
    """Move the complete library ``built`` to ``so`` (one rename) and record its hash beside it."""
    digest, size = sha256(built), built.stat().st_size
    os.chmod(built, 0o700)
    os.replace(built, so)
    atomic_write(_record_path(so), json.dumps({"file": so.name, "size": size, "sha256": digest}))


def verified(so: Path) -> bool:
    """Whether ``so`` exists, is this user's and nobody else's to write, and matches its recorded hash."""
    try:
        st = so.lstat()
        record = json.loads(_record_path(so).read_text())
    except (OSError, ValueError):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    if not isinstance(record, dict) or record.get("size") != st.st_size:
        return False
    return record.get("sha256") == sha256(so)


def remember_failure(build_dir: Path, why: str) -> None:
    """Note on disk that this build failed and why, so that new processes do not retry it at once."""
    with contextlib.suppress(OSError):  # a full disk may be the failure itself
        atomic_write(build_dir / "failed.json", json.dumps({"why": why, "time": time.time()}))


def remembered_failure(build_dir: Path, retry: bool) -> str | None:
    """The reason of a build failure recorded less than RETRY_FAILED_S ago (None to build again). With
    ``retry`` the record is dropped."""
    marker = build_dir / "failed.json"
    if retry:
        marker.unlink(missing_ok=True)
        return None
    try:
        record = json.loads(marker.read_text())
        why, when = str(record["why"]), float(record["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if time.time() - when > RETRY_FAILED_S:
        return None
    return why


def forget_failure(build_dir: Path) -> None:
    (build_dir / "failed.json").unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(build_dir: Path, what: str) -> Iterator[None]:
    """Hold ``build_dir``'s build lock; while another live process holds it, say so once on stderr and
    wait (at most LOCK_WAIT_S). The lock dies with its holder, so a killed build never blocks."""
    if fcntl is None:
        raise OSError("no file locking (fcntl) on this platform")
    path = build_dir / "build.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        waited, said = 0.0, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    print(
                        f"mita: waiting for another process building {what} (pid {holder})",
                        file=sys.stderr,
                        flush=True,
                    )
                    said = True
                if waited > LOCK_WAIT_S:
                    raise TimeoutError(
                        f"another process has been building {what} for over {LOCK_WAIT_S} s"
                    ) from None
                time.sleep(POLL_S)
                waited += POLL_S
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
