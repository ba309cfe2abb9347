"""Multi-crop batches with iBOT masks, in the format the GPFM distiller consumes.

The batch of ``B`` samples with ``n_g`` global crops of ``G`` px and ``n_l`` local crops of
``L`` px is::

    {"global_crops": (n_g*B, 3, G, G) float, "local_crops": (n_l*B, 3, L, L) float,
     "masks": (n_g*B, N) bool, "mask_indices": (M,) long, "masks_weight": (M,) float,
     "n_masked_patches": int M, "upperbound": int}

in crop-major order (all samples' crop 1, then all samples' crop 2, ...), ``N = (G / patch)^2``.
Samples that carry ``"global_crops_clean"`` (``MultiCropConfig.clean_global_crops``) add
``"global_crops_clean"``, stacked like ``global_crops``.
Masks come from :func:`gpfm_train.masking.collate_masks` (note §2.3).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_gpfm.errors import ParameterError

BATCH_KEYS = (
    "global_crops",
    "local_crops",
    "masks",
    "mask_indices",
    "masks_weight",
    "n_masked_patches",
    "upperbound",
)


@dataclass(frozen=True)
class MaskConfig:
    """iBOT masking of the global crops; defaults are GPFM's (note §2.1, §2.3)."""

    patch_size: int = 14
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5
    min_num_patches: int = 4
    max_num_patches_ratio: float = 0.5
    min_aspect: float = 0.3

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ParameterError(f"patch_size={self.patch_size} must be at least 1")
        if not 0 < self.max_num_patches_ratio <= 1:
            raise ParameterError(
                f"max_num_patches_ratio={self.max_num_patches_ratio} must lie in (0, 1]"
            )
        if not 0 < self.min_aspect <= 1:
            raise ParameterError(f"min_aspect={self.min_aspect} must lie in (0, 1]")

    def grid(self, crop_size: int) -> int:
        """Patches per side of a ``crop_size`` global crop."""
        if crop_size % self.patch_size:
            raise ParameterError(
                f"global crop size {crop_size} is not a multiple of patch_size={self.patch_size}; "
                "choose a crop size divisible by the patch size (224 = 16 x 14)"
            )
        return crop_size // self.patch_size


def _stack_crops(samples: list[dict[str, Any]], key: str):
    import torch

    counts = {len(s.get(key, ())) for s in samples}
    if len(counts) != 1:
        raise ParameterError(f"samples carry different numbers of {key}: {sorted(counts)}")
    n = counts.pop()
    if n == 0:
        return torch.empty((0, 3, 0, 0)), 0
    shapes = {tuple(c.shape) for s in samples for c in s[key]}
    if len(shapes) != 1:
        raise ParameterError(f"{key} differ in shape within the batch: {sorted(shapes)}")
    # Crop-major: crop k of every sample, then crop k + 1.
    return torch.stack([s[key][k] for k in range(n) for s in samples]), n


def collate_multicrop(
    samples: list[dict[str, Any]],
    mask_generator_cfg: MaskConfig,
    rng: random.Random | np.random.Generator,
) -> dict[str, Any]:
    """Stack the crops of ``samples`` crop-major and draw the iBOT masks from ``rng``.

    Args:
        samples: dicts with ``"global_crops"`` and ``"local_crops"`` lists of ``(3, S, S)``
            tensors (what :class:`gpfm_train.data.datasets.MultiCropDataset` returns).
        mask_generator_cfg: the masking parameters.
        rng: ``random.Random`` or ``numpy.random.Generator`` for the masks.
    """
    from gpfm_train.masking import MaskingGenerator, collate_masks

    if not samples:
        raise ParameterError("collate_multicrop got an empty batch")
    global_crops, n_global = _stack_crops(samples, "global_crops")
    if n_global == 0:
        raise ParameterError("samples have no global crops; iBOT masks need at least one")
    local_crops, _ = _stack_crops(samples, "local_crops")
    side = int(global_crops.shape[-1])
    if global_crops.shape[-2] != side:
        raise ParameterError(f"global crops must be square, got {tuple(global_crops.shape[-2:])}")
    cfg = mask_generator_cfg
    grid = cfg.grid(side)
    generator = MaskingGenerator(
        (grid, grid),
        max_num_patches=cfg.max_num_patches_ratio * grid * grid,
        min_num_patches=cfg.min_num_patches,
        min_aspect=cfg.min_aspect,
    )
    masks = collate_masks(
        int(global_crops.shape[0]),
        grid,
        cfg.mask_ratio_min_max,
        cfg.mask_sample_probability,
        generator=rng,
        mask_generator=generator,
    )
    batch: dict[str, Any] = {}
    if any("global_crops_clean" in s for s in samples):
        # Same geometry as global_crops; the distiller checks the shapes of any batch it gets.
        batch["global_crops_clean"] = _stack_crops(samples, "global_crops_clean")[0]
    return {
        **batch,
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks["masks"],
        "mask_indices": masks["mask_indices"],
        "masks_weight": masks["masks_weight"],
        "n_masked_patches": masks["n_masked_patches"],
        "upperbound": masks["upperbound"],
    }


class MultiCropCollator:
    """``collate_fn`` for a DataLoader: :func:`collate_multicrop` with a per-batch seeded rng.

    The mask generator is seeded from ``seed`` and the batch's sample seeds (see
    :class:`~gpfm_train.data.datasets.MultiCropDataset`), so a batch's masks depend only on which
    samples it holds: the same in any worker and after a resume.
    """

    def __init__(self, mask_config: MaskConfig | None = None, seed: int = 0) -> None:
        self.mask_config = mask_config or MaskConfig()
        self.seed = int(seed)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [int(s.get("seed", s.get("index", 0))) for s in samples]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, len(keys), *keys]))
        return collate_multicrop(samples, self.mask_config, rng)
