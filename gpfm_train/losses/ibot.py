"""iBOT masked-patch loss (DINOv2 ``iBOTPatchLoss``) on the masked patch tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpfm_train.losses.centering import CenteredTeacherLoss, _all_reduce_, sinkhorn_knopp


class iBOTPatchLoss(CenteredTeacherLoss):  # noqa: N801 - the method's own spelling
    """Patch-level DINO loss between the student's masked tokens and the teacher's targets.

    The center buffer has shape ``(1, 1, patch_out_dim)``; a batch contributes the mean of its
    masked teacher logits (averaged over ranks).
    """

    def __init__(
        self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: torch.Tensor) -> None:
        """Queue a center update from the ``(M, K)`` (or ``(1, M, K)``) masked teacher logits."""
        logits = teacher_patch_logits.reshape(-1, teacher_patch_logits.shape[-1])
        if logits.shape[0] == 0:
            self._queue_center_update(logits.new_zeros(logits.shape[-1]), 0.0)
        else:
            self._queue_center_update(logits.mean(dim=0), 1.0)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_patch_logits: torch.Tensor,
        teacher_temp: float,
        n_masked_patches: int | torch.Tensor,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for ``(M, K)`` logits; ``n_masked_patches`` is this rank's M."""
        n_global = torch.as_tensor(
            n_masked_patches, dtype=torch.float32, device=teacher_patch_logits.device
        ).clone()
        _all_reduce_(n_global)
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_global, n_iterations)

    def forward_masked(
        self,
        student_patch_logits_masked: torch.Tensor,
        teacher_patch_probs_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``-sum_masked(w * sum_k t * log_softmax(s/T_s)) / n_images``.

        Args:
            student_patch_logits_masked: ``(M, K)`` student head outputs of the masked tokens.
            teacher_patch_probs_masked: ``(M, K)`` teacher targets for the same tokens.
            student_masks_flat: ``(n_images, N)`` bool masks; the division is by ``n_images``,
                masked or not.
            n_masked_patches: keep only the first that many rows (padded buffers).
            masks_weight: ``(M,)`` per-token weight; default ``1 / (masked tokens in its image)``.
        """
        loss = torch.sum(
            teacher_patch_probs_masked
            * F.log_softmax(student_patch_logits_masked / self.student_temp, dim=-1),
            dim=-1,
        )
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(dim=-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]
