"""Losses of GPFM pretraining: DINOv2's three self-distillation terms plus expert distillation."""

from gpfm_train.losses.dino import DINOLoss
from gpfm_train.losses.expert import cosine_loss, patch_feature_loss, resize_token_grid
from gpfm_train.losses.ibot import iBOTPatchLoss
from gpfm_train.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "KoLeoLoss",
    "cosine_loss",
    "iBOTPatchLoss",
    "patch_feature_loss",
    "resize_token_grid",
]
