"""The slide layer on real slides and on pyramids of every layout napari-gpfm reads.

References are independent of the code under test: tiffslide's own ``read_region``,
tifffile-decoded pixels, and the arrays the factory wrote.
"""

from __future__ import annotations

import json
import shutil

import dask.array as da
import numpy as np
import pytest
import tifffile
import tiffslide
from PIL import Image
from slide_factory import (
    OME_CROP,
    SAMPLE,
    SAMPLE_MPP,
    SAMPLE_SIZE,
    TCGA_NO_MPP,
    SlideFiles,
    box_downsample,
    sample_pixels,
)

from napari_gpfm.errors import ParameterError, SlideError
from napari_gpfm.slides import Slide, file_fingerprint, open_slide
from napari_gpfm.slides.synthetic import default_level_count, write_synthetic_slide


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SlideFiles:
    return SlideFiles(tmp_path_factory.mktemp("slides"))


@pytest.fixture(scope="module")
def sample():
    with open_slide(SAMPLE) as slide:
        yield slide


@pytest.fixture(scope="module")
def reference():
    ts = tiffslide.TiffSlide(str(SAMPLE))
    yield ts
    ts.close()


def _check_chunks(level: da.Array, native: tuple[int, int]) -> None:
    """Every chunk but the last along an axis holds whole native tiles and is >= 512 px."""
    assert level.dtype == np.uint8 and level.ndim == 3 and level.shape[2] == 3
    assert level.chunks[2] == (3,)
    for axis in (0, 1):
        sizes = level.chunks[axis]
        assert sum(sizes) == level.shape[axis]
        for size in sizes[:-1]:
            assert size >= 512, level.chunks
            assert size % native[axis] == 0, (level.chunks, native)


# ---------------------------------------------------------------------- the real sample
def test_sample_metadata(sample):
    assert isinstance(sample, Slide)
    assert sample.dimensions == SAMPLE_SIZE
    assert sample.level_count == 1
    assert sample.level_dimensions == [SAMPLE_SIZE]
    assert sample.level_downsamples == [1.0]
    assert sample.has_mpp and sample.mpp_source == "metadata"
    assert sample.mpp == pytest.approx(SAMPLE_MPP, abs=1e-3)
    assert sample.mpp_xy == pytest.approx((SAMPLE_MPP, SAMPLE_MPP), abs=1e-3)
    assert sample.level_mpp(0) == pytest.approx(SAMPLE_MPP, abs=1e-3)
    assert sample.vendor == "aperio"
    assert sample.objective_power == 20
    assert sample.native_tile(0) == (240, 240)
    assert sample.properties["tiffslide.vendor"] == "aperio"
    assert sample.name == SAMPLE.name
    assert "2220x2967" in repr(sample) and "0.499" in repr(sample)


def test_sample_info_is_plain_json(sample):
    info = json.loads(json.dumps(sample.info()))
    assert (info["width"], info["height"]) == SAMPLE_SIZE
    assert info["mpp_x"] == pytest.approx(SAMPLE_MPP, abs=1e-3)
    assert info["vendor"] == "aperio" and info["channels"] == 3
    assert info["native_tile"] == [240, 240]
    assert info["file_size"] == SAMPLE.stat().st_size
    assert set(info["associated_images"]) == {"thumbnail", "label", "macro"}


def test_sample_associated_images_decode_to_rgb(sample):
    images = sample.associated_images
    assert set(images) == {"thumbnail", "label", "macro"}
    assert sample.associated_image_names == list(images)
    for name, img in images.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) > 300, name
        assert img.std() > 5, f"{name} decoded to a flat image"
    # The embedded thumbnail shows the same field as level 0.
    thumb = images["thumbnail"]
    assert thumb.shape[1] / thumb.shape[0] == pytest.approx(2220 / 2967, rel=0.01)


def test_sample_dask_pyramid_is_tile_aligned(sample):
    (level,) = sample.levels
    assert isinstance(level, da.Array)
    assert level.shape == (2967, 2220, 3)
    _check_chunks(level, (240, 240))
    assert level.chunks[0][0] == 720  # 3 native tiles: the smallest multiple of 240 >= 512
    assert sample.levels is sample.levels  # built once
    np.testing.assert_array_equal(
        level[700:900, 1000:1300].compute(), sample_pixels()[700:900, 1000:1300]
    )


@pytest.mark.parametrize(
    ("location", "size"),
    [((0, 0), (500, 400)), ((1013, 1507), (333, 271)), ((239, 479), (2, 2)), ((0, 0), SAMPLE_SIZE)],
)
def test_read_region_matches_tiffslide_inside(sample, reference, location, size):
    ours = sample.read_region(location, 0, size)
    theirs = reference.read_region(location, 0, size, as_array=True)
    assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("location", "size"),
    [((2000, 2800), (400, 300)), ((-50, -30), (100, 80)), ((2100, -20), (200, 60))],
)
def test_read_region_across_the_border_is_white_outside(sample, reference, location, size):
    x, y = location
    w, h = size
    ours = sample.read_region(location, 0, size)
    assert ours.shape == (h, w, 3)
    # The part inside the image, in output coordinates.
    ya, yb = max(0, -y), min(h, SAMPLE_SIZE[1] - y)
    xa, xb = max(0, -x), min(w, SAMPLE_SIZE[0] - x)
    inside = reference.read_region((x + xa, y + ya), 0, (xb - xa, yb - ya), as_array=True)
    np.testing.assert_array_equal(ours[ya:yb, xa:xb], inside)
    outside = np.ones((h, w), bool)
    outside[ya:yb, xa:xb] = False
    assert outside.any()
    assert (ours[outside] == 255).all()


def test_read_region_entirely_outside_is_white(sample):
    assert (sample.read_region((5000, 5000), 0, (64, 32)) == 255).all()
    assert (sample.read_region((-100, 10), 0, (100, 10)) == 255).all()


def test_read_region_rejects_bad_level_and_size(sample):
    with pytest.raises(ParameterError, match="level=1"):
        sample.read_region((0, 0), 1, (10, 10))
    with pytest.raises(ParameterError, match="level=-1"):
        sample.read_region((0, 0), -1, (10, 10))
    with pytest.raises(ParameterError, match="size"):
        sample.read_region((0, 0), 0, (0, 10))


def test_read_region_mpp_at_native_resolution_is_the_raw_pixels(sample, reference):
    # 0.5 um/px on a 0.499 um/px slide: 224 * 0.5 / 0.499 rounds to 224 source pixels.
    out = sample.read_region_mpp((600, 900), 224, 0.5)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(
        out, reference.read_region((600, 900), 0, (224, 224), as_array=True)
    )


def test_read_region_mpp_at_half_resolution_matches_a_resized_reference(sample, reference):
    out = sample.read_region_mpp((600, 900), 224, 1.0)
    assert out.shape == (224, 224, 3)
    span = round(224 * 1.0 / SAMPLE_MPP)  # 449 level-0 pixels cover 224 px at 1 um/px
    src = reference.read_region((600, 900), 0, (span, span), as_array=True)
    ref = np.asarray(Image.fromarray(src).resize((224, 224), Image.Resampling.LANCZOS))
    err = np.abs(out.astype(int) - ref).mean()
    assert err < 4, err
    # The same reference 6 level-0 px off is clearly worse: the comparison sees misplacement.
    shifted = reference.read_region((606, 906), 0, (span, span), as_array=True)
    ref_shifted = np.asarray(Image.fromarray(shifted).resize((224, 224), Image.Resampling.LANCZOS))
    assert np.abs(out.astype(int) - ref_shifted).mean() > 2 * err


def test_read_region_mpp_rejects_bad_mpp(sample):
    with pytest.raises(ParameterError, match="mpp"):
        sample.read_region_mpp((0, 0), 224, 0)


def test_thumbnail_size_and_content(sample):
    thumb = sample.thumbnail(512)
    assert thumb.dtype == np.uint8 and thumb.shape == (512, round(2220 * 512 / 2967), 3)
    ref = np.asarray(
        Image.fromarray(sample_pixels()).resize(thumb.shape[1::-1], Image.Resampling.BOX)
    )
    assert np.abs(thumb.astype(int) - ref).mean() < 3
    small = sample.thumbnail(100)
    assert max(small.shape[:2]) == 100
    # Asking for more than the slide has gives the slide itself.
    assert sample.thumbnail(4000).shape == (2967, 2220, 3)


def test_fingerprint_identifies_the_content(sample, tmp_path):
    fp = sample.fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == file_fingerprint(SAMPLE)
    copy = shutil.copyfile(SAMPLE, tmp_path / "renamed-copy.svs")
    with open_slide(copy) as again:
        assert again.fingerprint == fp  # same bytes, another name: same fingerprint
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF
    changed = tmp_path / "changed.svs"
    changed.write_bytes(bytes(data))
    assert file_fingerprint(changed) != fp
    with open_slide(OME_CROP) as other:
        assert other.fingerprint != fp


def test_context_manager_and_close(tmp_path):
    with open_slide(SAMPLE) as slide:
        assert slide.read_region((0, 0), 0, (4, 4)).shape == (4, 4, 3)
    slide.close()  # closing twice is harmless


# ---------------------------------------------------------------------- extra real slides
def test_ome_tiff_crop():
    with open_slide(OME_CROP) as slide:
        assert slide.dimensions == (1101, 1101)
        assert slide.mpp == pytest.approx(0.2271, abs=1e-4)
        assert slide.vendor is None and slide.objective_power is None
        _check_chunks(slide.levels[0], slide.native_tile(0))
        ts = tiffslide.TiffSlide(str(OME_CROP))
        np.testing.assert_array_equal(
            slide.read_region((300, 500), 0, (400, 300)),
            ts.read_region((300, 500), 0, (400, 300), as_array=True),
        )
        ts.close()


def test_slide_without_mpp_opens_and_asks_for_it():
    with open_slide(TCGA_NO_MPP) as slide:
        assert slide.dimensions == (4443, 3567)
        assert slide.level_count == 2
        assert slide.level_downsamples[1] == pytest.approx(2.0, abs=0.01)
        assert slide.vendor == "aperio"
        assert not slide.has_mpp and slide.mpp_source is None
        for attr in ("mpp", "mpp_xy"):
            with pytest.raises(SlideError) as err:
                getattr(slide, attr)
            msg = str(err.value)
            assert "mpp=" in msg and "--mpp" in msg and TCGA_NO_MPP.name in msg
            assert "\n" not in msg
        with pytest.raises(SlideError, match="--mpp"):
            slide.read_region_mpp((0, 0), 224, 0.5)
        assert slide.info()["mpp_x"] is None
        # Pixels still read (JPEG 2000 tiles).
        region = slide.read_region((2000, 1500), 0, (256, 256))
        assert region.std() > 5


def test_slide_without_mpp_accepts_a_given_mpp():
    with open_slide(TCGA_NO_MPP, mpp=0.5) as slide:
        assert slide.has_mpp and slide.mpp == 0.5 and slide.mpp_source == "user"
        assert slide.level_mpp(1) == pytest.approx(0.5 * slide.level_downsamples[1])
        # 1 um/px: the 2x level is read and only slightly resized.
        assert slide.best_level_for_downsample(2.0) == 1
        out = slide.read_region_mpp((2000, 1500), 128, 1.0)
        ref = slide.read_region((2000, 1500), 1, (128, 128))
        assert out.shape == (128, 128, 3)
        assert np.abs(out.astype(int) - ref).mean() < 3


def test_given_mpp_overrides_the_metadata():
    with open_slide(SAMPLE, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user"
        assert slide.info()["mpp_x"] == 0.25


@pytest.mark.parametrize(("size", "unit", "expected"),
                         [(0.499, None, 0.499), (499.0, "nm", 0.499), (0.000499, "mm", 0.499)])
def test_pixel_size_recorded_only_in_the_ome_xml_is_read(tmp_path, size, unit, expected):
    with open_slide(SAMPLE) as sample:
        rgb = np.asarray(sample.read_region((0, 0), 0, (512, 512)))[..., :3]
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit:
        meta |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    path = tmp_path / "xml_only.ome.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(256, 256), metadata=meta, ome=True)
    with tifffile.TiffFile(path) as tif:  # no resolution tags: only the XML knows
        assert tif.pages[0].tags["ResolutionUnit"].value == 1  # none: the tags say nothing
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(expected) and slide.mpp_source == "metadata"


def test_default_mpp_only_fills_in_a_missing_pixel_size():
    from slide_factory import TCGA_NO_MPP

    # A folder of mixed slides gets one --slide-mpp: it must not rescale those that record one.
    with open_slide(SAMPLE, default_mpp=0.25) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3) and slide.mpp_source == "metadata"
    with open_slide(TCGA_NO_MPP, default_mpp=1.0) as slide:
        assert slide.mpp == 1.0 and slide.mpp_source == "user"
    with pytest.raises(ParameterError, match="default_mpp=-1"):
        open_slide(TCGA_NO_MPP, default_mpp=-1)


# ---------------------------------------------------------------------- written pyramids
@pytest.mark.parametrize("kind", ["pyramid", "ome_pyramid"])
def test_tiled_pyramid_levels_and_pixels(files, kind):
    path = getattr(files, kind)
    image = files.pyramid_image
    with open_slide(path) as slide:
        assert slide.dimensions == (1024, 768)
        assert slide.level_count == 3
        assert slide.level_dimensions == [(1024, 768), (512, 384), (256, 192)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_mpp(2) == pytest.approx(1.0)
        assert slide.vendor is None
        for i, level in enumerate(slide.levels):
            _check_chunks(level, (256, 256))
            np.testing.assert_array_equal(level.compute(), box_downsample(image, 2**i))
        # Level-0 coordinates are divided by the downsample for the finer levels.
        np.testing.assert_array_equal(
            slide.read_region((200, 100), 1, (150, 120)), box_downsample(image, 2)[50:170, 100:250]
        )
        np.testing.assert_array_equal(
            slide.read_region((400, 320), 2, (64, 32)), box_downsample(image, 4)[80:112, 100:164]
        )
        assert slide.best_level_for_downsample(1.9) == 0
        assert slide.best_level_for_downsample(2.0) == 1
        assert slide.best_level_for_downsample(100) == 2
        # 1 um/px = level 2 exactly, no resizing.
        np.testing.assert_array_equal(
            slide.read_region_mpp((400, 320), 48, 1.0), box_downsample(image, 4)[80:128, 100:148]
        )
        thumb = slide.thumbnail(256)
        assert thumb.shape == (192, 256, 3)
        np.testing.assert_array_equal(thumb, box_downsample(image, 4))


def test_ome_pyramid_is_an_ome_series(files):
    with tifffile.TiffFile(files.ome_pyramid) as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 3


def test_jpeg_pyramid_levels_agree_with_level_zero(files):
    with open_slide(files.pyramid_jpeg) as slide:
        l0 = slide.read_region((0, 0), 0, slide.dimensions)
        assert np.abs(l0.astype(int) - files.pyramid_image).mean() < 4
        for level in (1, 2):
            f = 2**level
            lw, lh = slide.level_dimensions[level]
            got = slide.read_region((0, 0), level, (lw, lh))
            assert np.abs(got.astype(int) - box_downsample(l0, f)).mean() < 4


def test_strip_tiff_is_rechunked_into_squares(files):
    with open_slide(files.strips) as slide:
        assert slide.dimensions == (3000, 1500)
        assert slide.native_tile(0) == (16, 3000)  # the file's own strips
        (level,) = slide.levels
        assert level.chunksize == (1024, 1024, 3)
        for axis in (0, 1):
            assert all(size >= 512 for size in level.chunks[axis][:-1])
            assert level.chunks[axis][0] % (16 if axis == 0 else 1) == 0
        np.testing.assert_array_equal(
            level[1000:1100, 2000:2300].compute(), files.strip_image[1000:1100, 2000:2300]
        )
        np.testing.assert_array_equal(
            slide.read_region((2900, 1400), 0, (100, 100)), files.strip_image[1400:1500, 2900:3000]
        )


def test_small_strip_tiff_keeps_one_chunk(tmp_path):
    # Smaller than a square block: one chunk, not 16-row slivers.
    from slide_factory import he_image, write_strip_tiff

    image = he_image(224, 224)
    with open_slide(write_strip_tiff(tmp_path / "tile.tif", image, rowsperstrip=12)) as slide:
        assert slide.levels[0].chunks == ((224,), (224,), (3,))
        np.testing.assert_array_equal(slide.levels[0].compute(), image)


# ---------------------------------------------------------------------- synthetic slides
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_slide(folder / "synthetic.tif", 2600, 2048, mpp=0.25, seed=3)


def test_default_level_count():
    assert default_level_count(40_000, 40_000) == 7  # ... 1250, 625
    assert default_level_count(2600, 2048) == 3  # 2048, 1024, 512
    assert default_level_count(2600, 2047) == 2
    assert default_level_count(1023, 5000) == 1
    assert default_level_count(100_000, 100_000) == 8


def test_synthetic_slide_layout(synthetic):
    assert synthetic.name == "synthetic.tif"
    assert not synthetic.with_name("synthetic.tif.partial").exists()
    with tifffile.TiffFile(synthetic) as tif:
        assert tif.is_bigtiff
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert len(page.subifds) == 2
        assert "synthetic" in page.description
    with open_slide(synthetic) as slide:
        assert slide.dimensions == (2600, 2048)
        assert slide.level_dimensions == [(2600, 2048), (1300, 1024), (650, 512)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.25)
        assert slide.native_tile(1) == (256, 256)
        for level in slide.levels:
            _check_chunks(level, (256, 256))


def test_synthetic_slide_has_tissue_and_glass(synthetic):
    with open_slide(synthetic) as slide:
        thumb = slide.thumbnail(512).astype(int)
    h, w = thumb.shape[:2]
    centre = thumb[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
    corner = thumb[: h // 8, : w // 8]
    saturation = centre.max(axis=2) - centre.min(axis=2)
    assert centre.mean() < 200 and saturation.mean() > 30  # stained tissue
    assert corner.mean() > 225 and np.ptp(corner, axis=2).mean() < 15  # glass


def test_synthetic_levels_are_consistent(synthetic):
    with open_slide(synthetic) as slide:
        l0 = slide.read_region((512, 512), 0, (1024, 1024))
        l1 = slide.read_region((512, 512), 1, (512, 512))
    diff = np.abs(box_downsample(l0, 2).astype(int) - l1).mean()
    assert diff < 6, diff
    # Not trivially equal: each level is its own JPEG stream.
    assert diff > 0


def test_synthetic_is_deterministic_per_seed(tmp_path, synthetic):
    again = write_synthetic_slide(tmp_path / "again.tif", 2600, 2048, mpp=0.25, seed=3)
    other = write_synthetic_slide(tmp_path / "other.tif", 2600, 2048, mpp=0.25, seed=4)
    with open_slide(synthetic) as a, open_slide(again) as b, open_slide(other) as c:
        region = ((700, 600), 0, (800, 600))
        ra = a.read_region(*region)
        np.testing.assert_array_equal(ra, b.read_region(*region))
        assert np.abs(ra.astype(int) - c.read_region(*region)).mean() > 10


def test_synthetic_ome_with_explicit_levels_and_source(tmp_path):
    path = write_synthetic_slide(
        tmp_path / "syn.ome.tif",
        1500,
        1100,
        mpp=0.5,
        tile=128,
        levels=3,
        quality=70,
        ome=True,
        seed=1,
        source=OME_CROP,
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and "synthetic" in tif.ome_metadata
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    with open_slide(path) as slide:
        assert slide.level_dimensions == [(1500, 1100), (750, 550), (375, 275)]
        assert slide.mpp == pytest.approx(0.5)
        assert slide.native_tile(0) == (128, 128)
        _check_chunks(slide.levels[2], (128, 128))
        l1 = slide.read_region((0, 0), 1, (750, 550))
        l2 = slide.read_region((0, 0), 2, (375, 275))
    assert np.abs(box_downsample(l1, 2).astype(int) - l2).mean() < 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0, "height": 100}, "width=0"),
        ({"width": 1000, "height": 1000, "tile": 100}, "tile=100"),
        ({"width": 1000, "height": 1000, "mpp": 0}, "mpp=0"),
        ({"width": 1000, "height": 1000, "quality": 0}, "quality=0"),
        ({"width": 1000, "height": 1000, "levels": 12}, "levels=12"),
        ({"width": 1000, "height": 1000, "tile": 4096}, "tile=4096"),
    ],
)
def test_synthetic_rejects_bad_parameters(tmp_path, kwargs, match):
    with pytest.raises(ParameterError, match=match):
        write_synthetic_slide(tmp_path / "bad.tif", **kwargs)
    assert not list(tmp_path.iterdir())
