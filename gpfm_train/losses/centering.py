"""Teacher-side normalisation shared by the DINO and iBOT losses.

Two schemes turn teacher logits into target distributions:

* Softmax centering (GPFM): ``softmax((t - center) / T)``. The center is an EMA of the teacher
  logits, ``center <- m * center + (1 - m) * batch_center``, updated *after* it has been used:
  :meth:`CenteredTeacherLoss.update_center` starts an (asynchronous, when ``torch.distributed`` is
  initialised) all-reduce and the new value is applied lazily by the next
  :meth:`~CenteredTeacherLoss.softmax_center_teacher` call (or before the state dict is saved).
* Sinkhorn-Knopp (DINOv2's default, not used by GPFM): three row/column normalisations of
  ``exp(t / T)`` across all ranks.

The batch center is all-reduced as ``[sum of contributions, their count]`` so that the update is
``sum / count`` over all ranks. With equal per-rank batches this is exactly DINOv2's
``all_reduce(sum) / (len * world_size)``; a rank with nothing to contribute (no masked patch)
sends zeros instead of a NaN mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def distributed_ready() -> bool:
    """True when a default process group exists (collectives must then be called on every rank)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed_ready() else 1


def _all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if distributed_ready():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_samples_global: int | torch.Tensor,
    n_iterations: int = 3,
) -> torch.Tensor:
    """DINOv2's distributed Sinkhorn-Knopp on ``(n, K)`` logits; returns ``(n, K)`` targets.

    ``n_samples_global`` is the number of rows summed over all ranks. The logits are shifted by
    their global maximum before ``exp``; the shift is a common factor that the first
    normalisation removes, so the result equals DINOv2's formula without its fp32 overflow.
    """
    logits = teacher_logits.float() / teacher_temp
    shift = logits.max().detach().clone() if logits.numel() else logits.new_zeros(())
    _all_reduce_(shift, dist.ReduceOp.MAX)
    q = torch.exp(logits - shift).t()  # (K, n)
    n_global = torch.as_tensor(n_samples_global, dtype=q.dtype, device=q.device)
    k = q.shape[0]
    total = _all_reduce_(q.sum())
    q /= total
    for _ in range(n_iterations):
        rows = _all_reduce_(q.sum(dim=1, keepdim=True))
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_global
    q *= n_global
    return q.t()


class CenteredTeacherLoss(nn.Module):
    """Base class holding the teacher center buffer (``(1, K)`` or ``(1, 1, K)``)."""

    def __init__(
        self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self._pending: torch.Tensor | None = None
        self._pending_handle = None

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """``softmax((t - center) / T)`` over the last dim, after applying any pending update."""
        self.apply_center_update()
        center = self.center.reshape(-1)
        return torch.softmax((teacher_logits - center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def _queue_center_update(self, contribution: torch.Tensor, count: float) -> None:
        # Collective on every rank, even one with count 0, so no rank waits forever.
        packed = torch.cat(
            (contribution.reshape(-1).float(), contribution.new_full((1,), count).float())
        )
        self.apply_center_update()
        self._pending = packed
        if distributed_ready():
            self._pending_handle = dist.all_reduce(packed, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the pending batch center into ``center`` (waits for its all-reduce)."""
        if self._pending is None:
            return
        if self._pending_handle is not None:
            self._pending_handle.wait()
            self._pending_handle = None
        packed, self._pending = self._pending, None
        count = packed[-1]
        batch_center = packed[:-1] / count.clamp(min=1.0)
        batch_center = batch_center.reshape(self.center.shape).to(self.center.dtype)
        m = self.center_momentum
        # torch.where instead of a Python `if` keeps the GPU stream free of a host sync.
        self.center = torch.where(count > 0, self.center * m + batch_center * (1 - m), self.center)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        # A checkpoint must not lose the update queued by the last step.
        self.apply_center_update()
        super()._save_to_state_dict(destination, prefix, keep_vars)
