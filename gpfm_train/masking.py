"""iBOT block masks for the global crops (BEiT ``MaskingGenerator`` + DINOv2 collate scheme).

Per batch of ``n`` global-crop images (``n = n_global * B``, crop-major):

* ``int(n * mask_sample_probability)`` images get a mask; image ``i`` of them asks for
  ``int(N * U(p_i, p_{i+1}))`` patches with ``p = linspace(ratio_min, ratio_max, n_masked + 1)``;
  the others get an empty mask; the list is shuffled.
* Each mask is a union of random rectangles (BEiT): area ``U(min_num_patches, remaining)``
  (at most ``max_num_patches`` per block), log-uniform aspect ratio in ``[0.3, 1/0.3]``, up to
  10 placement attempts per block; a block counts only its newly masked patches, and the mask
  stops growing when a block adds nothing.

All randomness comes from the generator passed in (``random.Random`` or
``numpy.random.Generator``), so data-loader workers are reproducible. With a ``random.Random``
the draws are the ones DINOv2 makes with the global ``random`` module. The ratio bins are computed
in float64 (DINOv2: float32 ``torch.linspace``), which can move a request by one patch when
``N * p`` falls exactly on an integer.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from napari_gpfm.errors import ParameterError

RandomSource = random.Random | np.random.Generator


class _Draws:
    """Uniform floats, inclusive integers and permutations from either kind of generator."""

    def __init__(self, generator: RandomSource) -> None:
        if isinstance(generator, random.Random):
            self._random = generator.random
            self._randint = generator.randint
            self._shuffle = generator.shuffle
        elif isinstance(generator, np.random.Generator):
            self._random = generator.random
            self._randint = lambda a, b: int(generator.integers(a, b + 1))
            self._shuffle = generator.shuffle
        else:
            raise TypeError(
                f"generator must be random.Random or numpy.random.Generator, got {type(generator)}"
            )

    def uniform(self, a: float, b: float) -> float:
        # Same formula as random.Random.uniform; valid for b < a too.
        return a + (b - a) * float(self._random())

    def randint(self, a: int, b: int) -> int:
        return self._randint(a, b)

    def shuffle(self, items: list[Any]) -> None:
        self._shuffle(items)


class MaskingGenerator:
    """BEiT block-wise mask generator on an ``input_size`` patch grid.

    Args:
        input_size: the patch grid ``(h, w)`` (16x16 for 224 px crops and patch 14).
        max_num_patches: cap on the patches one block may add; default ``0.5 * h * w``.
        min_num_patches: smallest target block area.
        min_aspect: smallest aspect ratio; the largest is ``max_aspect`` or ``1 / min_aspect``.
        max_attempts: placement attempts per block.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = (16, 16),
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.max_num_patches = (
            0.5 * self.num_patches if max_num_patches is None else max_num_patches
        )
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, draws: _Draws) -> int:
        delta = 0
        for _ in range(self.max_attempts):
            target_area = draws.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(draws.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = draws.randint(0, self.height - h)
                left = draws.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask_patches:
                    window[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int, generator: RandomSource) -> np.ndarray:
        """An ``(h, w)`` bool mask with at most ``num_masking_patches`` True entries."""
        draws = generator if isinstance(generator, _Draws) else _Draws(generator)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, draws)
            if delta == 0:
                break
            count += delta
        return mask


def collate_masks(
    n_global_images: int,
    grid: int | tuple[int, int],
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    *,
    generator: RandomSource,
    mask_generator: MaskingGenerator | None = None,
) -> dict[str, Any]:
    """Masks for one batch of global crops, in the batch format of
    :mod:`gpfm_train.models.meta_arch`.

    Args:
        n_global_images: number of global-crop images in the batch (``n_global * B``).
        grid: the patch grid of a global crop (``16`` or ``(16, 16)``).
        mask_ratio_min_max: range of the masked fraction of a masked image.
        mask_sample_probability: fraction of the images that get a mask.
        generator: ``random.Random`` or ``numpy.random.Generator`` (seed it per worker).
        mask_generator: the block generator; default ``MaskingGenerator(grid)`` (max 0.5*N).

    Returns:
        ``masks`` ``(n, N)`` bool tensor, ``mask_indices`` ``(M,)`` long flat indices into
        ``(n * N)`` (DINOv2's ``mask_indices_list``), ``masks_weight`` ``(M,)`` float32 equal to
        ``1 / (masked patches in that image)``, ``n_masked_patches`` (int ``M``) and
        ``upperbound`` (int ``sum_i int(N * p_{i+1})``, an upper bound on ``M``).
    """
    import torch

    lo, hi = (float(v) for v in mask_ratio_min_max)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ParameterError(
            f"mask_ratio_min_max={mask_ratio_min_max} must satisfy 0 <= min <= max <= 1"
        )
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ParameterError(
            f"mask_sample_probability={mask_sample_probability} must lie in [0, 1]"
        )
    if n_global_images < 1:
        raise ParameterError(f"n_global_images={n_global_images} must be at least 1")
    grid_hw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if mask_generator is None:
        mask_generator = MaskingGenerator(grid_hw)
    elif (mask_generator.height, mask_generator.width) != grid_hw:
        raise ParameterError(
            f"mask_generator grid {(mask_generator.height, mask_generator.width)} differs from "
            f"grid={grid_hw}"
        )
    n_patches = grid_hw[0] * grid_hw[1]
    draws = _Draws(generator)

    n_masked_images = int(n_global_images * mask_sample_probability)
    probs = np.linspace(lo, hi, n_masked_images + 1)
    upperbound = 0
    masks: list[np.ndarray] = []
    for i in range(n_masked_images):
        requested = int(n_patches * draws.uniform(probs[i], probs[i + 1]))
        masks.append(mask_generator(requested, draws))
        upperbound += int(n_patches * probs[i + 1])
    masks += [np.zeros(grid_hw, dtype=bool) for _ in range(n_global_images - n_masked_images)]
    draws.shuffle(masks)

    masks_t = torch.from_numpy(np.stack(masks).reshape(n_global_images, n_patches))
    mask_indices = masks_t.flatten().nonzero().flatten()
    per_image = 1.0 / masks_t.sum(dim=-1).clamp(min=1).float()
    masks_weight = per_image.unsqueeze(-1).expand_as(masks_t)[masks_t]
    return {
        "masks": masks_t,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": int(mask_indices.shape[0]),
        "upperbound": upperbound,
    }
