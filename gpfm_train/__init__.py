"""gpfm_train: GPFM pretraining (DINOv2 self-distillation + expert distillation) on Lightning.

Importing this package imports neither torch nor Lightning; the heavy parts live in the
subpackages and modules that need them:

* :mod:`gpfm_train.models` -- the student/teacher ViT (:mod:`~gpfm_train.models.vit`), the DINO
  and expert heads (:mod:`~gpfm_train.models.heads`) and the distiller
  (:mod:`~gpfm_train.models.meta_arch`).
* :mod:`gpfm_train.losses` -- DINO, iBOT, KoLeo and expert-distillation losses.
* :mod:`gpfm_train.masking` -- iBOT block masks and their collation.
* :mod:`gpfm_train.schedules` / :mod:`gpfm_train.optim` -- per-iteration schedules and
  parameter groups.
* :mod:`gpfm_train.export_weights` -- teacher export to timm and to the GPFM release layout.
"""

from __future__ import annotations

__all__: list[str] = []
