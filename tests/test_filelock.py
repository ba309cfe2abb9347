"""The single-writer lock of stores and libraries, raced by real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from napari_gpfm._filelock import exclusive_lock


def _hold(lock: str, barrier, results) -> None:
    barrier.wait()
    try:
        with exclusive_lock(Path(lock), RuntimeError):
            start = time.monotonic()
            time.sleep(0.05)
            results.put((start, time.monotonic()))
    except RuntimeError:
        results.put(None)


def _dead_pid() -> int:
    proc = mp.get_context("fork").Process(target=int)
    proc.start()
    proc.join()
    return proc.pid


@pytest.mark.parametrize("left_behind", ["dead owner", "empty file", "none"])
def test_racing_processes_never_hold_the_lock_together(tmp_path, left_behind):
    # Three processes finding the same stale lock each took it over: with a dead owner's lock
    # two of them held it at once in about one round in four, so both wrote a library.
    ctx = mp.get_context("fork")
    lock = tmp_path / ".lock"
    dead = _dead_pid()
    for _round in range(20):
        if left_behind == "dead owner":
            lock.write_text(f"{dead}@{socket.gethostname()}")
        elif left_behind == "empty file":
            lock.write_text("")
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_hold, args=(str(lock), barrier, results))
                 for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        held = sorted(r for r in (results.get(timeout=5) for _ in procs) if r is not None)
        assert held, "nobody got the lock"
        assert all(a[1] <= b[0] for a, b in zip(held, held[1:], strict=False)), held
        assert not lock.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_live_owner_keeps_the_lock(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text(f"{os.getpid()}@{socket.gethostname()}")
    with pytest.raises(RuntimeError, match=str(os.getpid())), exclusive_lock(lock, RuntimeError):
        pytest.fail("the lock of a live owner was taken")
    assert lock.read_text().startswith(str(os.getpid()))
