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
* :mod:`gpfm_train.data` -- slide/tile manifests and their schema, tile datasets read straight
  from WSIs or tile folders, the DINOv2 multi-crop augmentation, the mask-building collate and
  the resumable rank-sharded sampler.
* :mod:`gpfm_train.module` / :mod:`gpfm_train.datamodule` -- the LightningModule (one GPFM
  step: losses, schedules, clipping, EMA, logging) and the LightningDataModule.
* :mod:`gpfm_train.export_weights` / :mod:`gpfm_train.export` -- teacher export to timm and to
  the GPFM release layout, with the JSON napari_gpfm reads.
* :mod:`gpfm_train.cohort` -- cohort embedding under Lightning's predict loop (the same stores
  as ``gpfm embed``).
* :mod:`gpfm_train.cli` (``gpfm-train fit | export | manifest | embed``, also
  ``python -m gpfm_train``) and its YAML configs in ``gpfm_train/configs/``.
"""

from __future__ import annotations

__all__: list[str] = []
