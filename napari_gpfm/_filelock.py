"""A single-writer lock file shared by the embedding store and the library index.

A hard link (or ``O_CREAT | O_EXCL``) makes taking the lock atomic; the file holds
``pid@host`` from its first moment, so that a lock left behind by a process that died on this
machine is taken over instead of blocking the user forever, and a takeover is itself guarded
so that two processes finding the same stale lock do not both end up holding it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the takeover is then not guarded against a simultaneous one
    fcntl = None  # type: ignore[assignment]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _create_owned(lock: Path, me: str) -> bool:
    """Create ``lock`` holding ``me``; False when it exists. The file is written aside and
    hard-linked into place, so another process never reads it empty (and takes it for stale)."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(me, encoding="utf-8")
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: create, then write
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(me)
            return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _is_stale(owner: str) -> bool:
    pid, _, host = owner.partition("@")
    if not owner:  # not written by this module (ours are never empty): nobody holds it
        return True
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def _take_over(lock: Path) -> str:
    """Remove ``lock`` if its owner is gone; returns the owner found ("" when removed).

    Two processes may find the same stale lock: the check and the removal happen under an
    ``flock`` of that very file, and only while the path still names it, so the second one
    cannot remove the lock the first one has just created in its place.
    """
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return ""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                return ""  # replaced meanwhile: look again
        except FileNotFoundError:
            return ""
        owner = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if not _is_stale(owner):
            return owner
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        return ""
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def exclusive_lock(lock: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold ``lock`` for the block. ``busy(owner)`` builds the error raised when a live process
    (``owner`` = ``pid@host``) holds it."""
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _attempt in range(5):
        if _create_owned(lock, me):
            break
        owner = _take_over(lock)
        if owner:
            raise busy(owner)
    else:  # pragma: no cover - other processes re-created the lock again and again
        raise busy("another process")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
