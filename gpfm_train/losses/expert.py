"""Expert-distillation losses (GPFM ``kl_loss.py``: ``Cosine`` and ``FeatureLoss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean(cos(student, target))`` along the last dim, in fp32."""
    return 1.0 - F.cosine_similarity(student.float(), target.float(), dim=-1).mean()


def resize_token_grid(tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a ``(B, h, w, D)`` token grid to ``grid_hw``; returns ``(B, H*W, D)``.

    ``align_corners=False``, no antialiasing (GPFM resizes 14x14 expert grids up to 16x16).
    """
    batch, h, w, dim = tokens.shape
    if (h, w) != tuple(grid_hw):
        grid = tokens.permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False)
        tokens = grid.permute(0, 2, 3, 1)
    return tokens.reshape(batch, -1, dim)


def patch_feature_loss(
    student_tokens: torch.Tensor,
    expert_tokens: torch.Tensor,
    student_grid_hw: tuple[int, int],
    cos_weight: float = 0.9,
    smooth_l1_weight: float = 0.1,
) -> torch.Tensor:
    """``0.9 * (1 - mean cos) + 0.1 * SmoothL1(beta=1, mean)`` between patch tokens.

    Args:
        student_tokens: ``(B, N, D)`` student head outputs, ``N = H * W`` of ``student_grid_hw``.
        expert_tokens: ``(B, h, w, D)`` expert patch tokens, resized to the student's grid first.
        student_grid_hw: the student's patch grid ``(H, W)``.
    """
    target = resize_token_grid(expert_tokens, student_grid_hw).float()
    student = student_tokens.float()
    if student.shape != target.shape:
        raise ValueError(
            f"student tokens {tuple(student.shape)} do not match the resized expert tokens "
            f"{tuple(target.shape)}"
        )
    cos_term = cosine_loss(student, target)
    l1_term = F.smooth_l1_loss(student, target, beta=1.0, reduction="mean")
    return cos_weight * cos_term + smooth_l1_weight * l1_term
