"""The training progress bar: one bar over the run's optimizer steps.

Pretraining reads an infinite, resumable stream (``data.sampler``), so Lightning's epoch has no
meaning here: its own bars said "Epoch 0/-2" (``max_epochs=-1`` minus one) and, after a resume,
"6/3" (steps done counted from zero, steps left as the total). This bar counts what the user
set: ``global_step`` out of ``max_steps``, starting where a resumed run starts, with the loss.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


class StepProgressBar(ProgressBar):
    """Optimizer steps done / ``trainer.max_steps`` on rank 0, with the logged loss."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=trainer.max_steps,
            initial=trainer.global_step,
            desc="step",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        loss = trainer.progress_bar_metrics.get("loss")
        if loss is not None:
            self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
