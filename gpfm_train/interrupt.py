"""Ctrl-C during ``gpfm-train fit``: finish the step, save it, stop.

Lightning's own answer to SIGINT abandons the run where it is, so everything since the last
periodic checkpoint (up to ``checkpoint_every_n_steps`` steps) is lost. Here the first SIGINT
only asks to stop: the step in flight completes, every rank agrees to stop after it, and the
final-step checkpoint (``cli._checkpoint_callback``) saves that step as ``last.ckpt``, from which
``--ckpt-path last`` resumes exactly. A second SIGINT gets the previous handler back and aborts
at once, for a run stuck in a step: Lightning then exits with status 1 (and leaves SIGINT
ignored), which ``gpfm-train fit`` turns into a line naming the newest checkpoint
(:func:`aborted_by_user`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from lightning.pytorch.callbacks import Callback


class StopOnInterrupt(Callback):
    """Stop cleanly after the current step on the first SIGINT (see the module notes)."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def request_stop(self, *_: Any) -> None:
        """What SIGINT does while training: ask once, then let a second SIGINT abort."""
        self.requested = True
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.requested, self.stopped_at = False, None
        # Signal handlers can only be set from the main thread (a notebook's worker thread
        # keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self.request_stop)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # One rank's interrupt stops them all, at the same step, so they save together.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.should_stop = True
            self.stopped_at = trainer.global_step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        global _aborted
        self._restore()
        if isinstance(exception, KeyboardInterrupt):
            _aborted = True


_aborted = False


def aborted_by_user() -> bool:
    """Whether the last fit ended on a second Ctrl-C (read once: the flag is cleared)."""
    global _aborted
    was, _aborted = _aborted, False
    return was


def ignore_interrupts_in_workers(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the terminal's Ctrl-C reaches the workers too, and a worker
    that dies of it breaks the step the main process is finishing; the main process decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
