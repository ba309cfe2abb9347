"""Models of GPFM pretraining: the timm ViT backbone, the projection heads and the distiller."""

from gpfm_train.models.heads import DINOHead, ExpertHead
from gpfm_train.models.meta_arch import (
    RECIPE_EXPERTS,
    DistillConfig,
    ExpertConfig,
    GPFMDistiller,
)
from gpfm_train.models.vit import backbone_forward, build_student_backbone, timm_state_dict

__all__ = [
    "RECIPE_EXPERTS",
    "DINOHead",
    "DistillConfig",
    "ExpertConfig",
    "ExpertHead",
    "GPFMDistiller",
    "backbone_forward",
    "build_student_backbone",
    "timm_state_dict",
]
