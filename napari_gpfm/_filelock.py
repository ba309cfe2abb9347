"""A single-writer lock file shared by the embedding store and the library index.

``O_CREAT | O_EXCL`` makes taking the lock atomic on a local file system; the file holds
``pid@host`` so that a lock left behind by a process that died on this machine is taken over
instead of blocking the user forever.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def exclusive_lock(lock: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold ``lock`` for the block. ``busy(owner)`` builds the error raised when a live process
    (``owner`` = ``pid@host``) holds it."""
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = ""
            with contextlib.suppress(OSError):
                owner = lock.read_text(encoding="utf-8").strip()
            pid, _, host = owner.partition("@")
            stale = host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))
            if stale or not owner:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            raise busy(owner) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(me)
        break
    else:  # pragma: no cover - another process re-created the lock twice in a row
        raise busy("another process")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
