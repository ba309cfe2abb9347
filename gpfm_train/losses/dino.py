"""DINO CLS-token loss (DINOv2 ``DINOLoss``), with softmax centering or Sinkhorn-Knopp targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gpfm_train.losses.centering import CenteredTeacherLoss, sinkhorn_knopp, world_size


class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy between teacher targets and student prototype scores.

    ``forward`` returns ``sum over (student s, teacher t) pairs of
    -mean_b sum_k t * log_softmax(s / T_s)``; the caller divides by the number of loss terms.
    The center buffer has shape ``(1, out_dim)``.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__((1, out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Queue ``center <- m*center + (1-m)*mean(teacher_logits)`` (mean over all ranks)."""
        self._queue_center_update(teacher_logits.sum(dim=0), float(teacher_logits.shape[0]))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets; every rank is assumed to hold the same number of rows."""
        n_global = teacher_logits.shape[0] * world_size()
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_global, n_iterations)

    def forward(
        self,
        student_logits_list: Sequence[torch.Tensor],
        teacher_probs_list: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        total = 0.0
        for student_logits in student_logits_list:
            log_probs = F.log_softmax(student_logits / self.student_temp, dim=-1)
            for teacher_probs in teacher_probs_list:
                total = total - torch.sum(teacher_probs * log_probs, dim=-1).mean()
        return total
