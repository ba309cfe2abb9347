"""iBOT block masks: statistics of the collated batch, block shapes, determinism under a seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gpfm_train.masking import MaskingGenerator, collate_masks
from napari_gpfm.errors import ParameterError

GRID = 16
N = GRID * GRID


def _upperbound_ref(n_images: int, lo: float = 0.1, hi: float = 0.5, prob: float = 0.5) -> int:
    n_masked = int(n_images * prob)
    step = (hi - lo) / n_masked
    return sum(int(N * (lo + step * (i + 1))) for i in range(n_masked))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_collated_mask_statistics(seed):
    n_images = 64  # 2 global crops x 32 images
    out = collate_masks(n_images, GRID, generator=random.Random(seed))
    masks = out["masks"]
    assert masks.shape == (n_images, N) and masks.dtype == torch.bool

    counts = masks.sum(-1)
    masked = counts > 0
    assert int(masked.sum()) == n_images // 2  # mask_sample_probability = 0.5

    # Image i of the masked ones asks for int(N * U(p_i, p_{i+1})) patches and never gets more,
    # so the k-th smallest count is at most int(N * p_{k+1}); no image exceeds 0.5 * N.
    probs = np.linspace(0.1, 0.5, n_images // 2 + 1)
    sorted_counts = torch.sort(counts[masked]).values
    for k, count in enumerate(sorted_counts.tolist()):
        assert count <= int(N * probs[k + 1])
    assert int(counts.max()) <= N // 2
    ratios = counts[masked].float() / N
    assert 0.1 <= float(ratios.mean()) <= 0.31

    # Indices, weights and counts agree with the masks.
    flat = masks.flatten()
    torch.testing.assert_close(out["mask_indices"], flat.nonzero().flatten())
    assert out["n_masked_patches"] == int(flat.sum()) == out["mask_indices"].shape[0]
    image_of_token = out["mask_indices"] // N
    per_image = torch.zeros(n_images).index_add_(0, image_of_token, out["masks_weight"])
    torch.testing.assert_close(per_image[masked], torch.ones(int(masked.sum())))
    assert torch.all(per_image[~masked] == 0)
    for token, image in zip(out["mask_indices"].tolist(), image_of_token.tolist(), strict=True):
        assert masks.flatten()[token] and image == token // N
    assert out["upperbound"] == _upperbound_ref(n_images)
    assert out["n_masked_patches"] <= out["upperbound"]


def test_masked_images_are_shuffled_across_the_batch():
    positions = set()
    for seed in range(5):
        masks = collate_masks(16, GRID, generator=random.Random(seed))["masks"]
        positions.add(tuple(masks.any(-1).tolist()))
    assert len(positions) > 1
    assert tuple([True] * 8 + [False] * 8) not in positions or len(positions) > 2


def test_masks_are_deterministic_under_a_seed():
    a = collate_masks(32, GRID, generator=random.Random(11))
    b = collate_masks(32, GRID, generator=random.Random(11))
    c = collate_masks(32, GRID, generator=random.Random(12))
    assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["masks_weight"], b["masks_weight"])
    assert not torch.equal(a["masks"], c["masks"])

    d = collate_masks(32, GRID, generator=np.random.default_rng(5))
    e = collate_masks(32, GRID, generator=np.random.default_rng(5))
    f = collate_masks(32, GRID, generator=np.random.default_rng(6))
    assert torch.equal(d["masks"], e["masks"]) and not torch.equal(d["masks"], f["masks"])
    assert int(d["masks"].any(-1).sum()) == 16


def _adjacent_pairs(mask: np.ndarray) -> int:
    return int((mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum())


def test_masks_reach_the_request_with_contiguous_blocks():
    gen = MaskingGenerator((GRID, GRID))
    rng = random.Random(3)
    exact = 0
    for request in range(12, 129, 4):
        mask = gen(request, rng)
        count = int(mask.sum())
        assert 0 < count <= request
        exact += count == request
        if count <= 60:
            # Blocks, not scattered cells: a random scatter of `count` cells has about
            # count**2 / 136 adjacent pairs (< count / 2 here); rectangles about two per cell.
            assert _adjacent_pairs(mask) >= count
    assert exact >= 27  # of 30 requests; a mask stops early only when 10 placements fail


def test_large_requests_are_unions_of_blocks_capped_by_max_patches():
    gen = MaskingGenerator((GRID, GRID), max_num_patches=20)
    rng = np.random.default_rng(0)
    mask = gen(120, rng)
    count = int(mask.sum())
    assert 60 <= count <= 120  # several blocks of at most 20 new patches each
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box > count


def test_no_mask_and_invalid_parameters():
    empty = collate_masks(8, GRID, mask_sample_probability=0.0, generator=random.Random(0))
    assert not empty["masks"].any() and empty["n_masked_patches"] == 0 and empty["upperbound"] == 0
    assert empty["mask_indices"].shape == (0,) and empty["masks_weight"].shape == (0,)
    with pytest.raises(ParameterError, match="mask_ratio_min_max"):
        collate_masks(8, GRID, mask_ratio_min_max=(0.6, 0.2), generator=random.Random(0))
    with pytest.raises(ParameterError, match="mask_sample_probability"):
        collate_masks(8, GRID, mask_sample_probability=1.5, generator=random.Random(0))
    with pytest.raises(ParameterError, match="grid"):
        collate_masks(8, GRID, generator=random.Random(0), mask_generator=MaskingGenerator(8))
    with pytest.raises(TypeError):
        collate_masks(8, GRID, generator=torch.Generator())
