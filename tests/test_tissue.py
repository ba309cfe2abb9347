"""Tissue detection: the real sample, hand-made masks with known answers, glass-only slides."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import points_in_poly
from slide_factory import he_image, write_pyramid

from napari_gpfm.errors import ParameterError, SlideError
from napari_gpfm.slides import open_slide
from napari_gpfm.tiling.tissue import (
    OTSU_MIN,
    TissueMask,
    TissueParams,
    detect_tissue,
    read_overview,
)

# Hand-checked on the sample's thumbnail (2220 x 2967 px, skin): glass all around the tissue
# (left, right, corners), tissue in the middle column and along the bottom.
GLASS_POINTS = [(60, 60), (2160, 60), (2160, 1500), (150, 1500), (2160, 2900), (200, 2850),
                (1900, 550)]
TISSUE_POINTS = [(1100, 1500), (900, 2700), (1500, 2500), (800, 2000), (1050, 900)]


@pytest.fixture(scope="module")
def sample(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        yield slide


@pytest.fixture(scope="module")
def sample_mask(sample):
    return detect_tissue(sample)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    hi = rgb.max(axis=2)
    return (hi - rgb.min(axis=2)) / np.maximum(hi, 1)


def test_sample_tissue_found_and_glass_left_out(sample, sample_mask):
    m = sample_mask
    assert m.mask.shape == (186, 139)  # 8 um/px over 0.499 um/px: 16x
    assert m.downsample == (16.0, 16.0)
    assert 0.3 < m.fraction < 0.5  # the thumbnail shows about 40% tissue
    assert 0.5 < m.area_mm2 < 0.8
    for x, y in GLASS_POINTS:
        assert m.fraction_in(x - 40, y - 40, 80, 80) == 0.0, (x, y)
    for x, y in TISSUE_POINTS:
        assert m.fraction_in(x - 40, y - 40, 80, 80) > 0.75, (x, y)
    # Against the pixels: what the mask calls tissue is coloured, the rest is bright glass.
    rgb, _ = read_overview(sample, 8.0)
    sat = _saturation(rgb)
    assert sat[m.mask].mean() > 0.25
    assert np.percentile(sat[~m.mask], 95) < 0.1
    assert rgb[~m.mask].mean() > 225


def test_sample_keeps_the_thin_dermal_strand(sample_mask):
    # The horizontal strand on the left (x 80-720, y ~1010-1150) is tissue a few mask px thick;
    # an opening or a too-strict threshold would erase it.
    assert sample_mask.fraction_in(300, 1050, 200, 50) > 0.5
    assert sample_mask.fraction_in(300, 1250, 200, 50) == 0.0  # glass just below it


@pytest.mark.parametrize("factor", [16, 7])
def test_overview_is_an_exact_area_average(sample, factor):
    # 16 divides the sample's 240 px native tiles; 7 does not: blocks straddle tile edges.
    rgb, ds = read_overview(sample, 0.499 * factor)
    full = sample.read_region((0, 0), 0, sample.dimensions).astype(np.float64)
    h, w = full.shape[0] // factor, full.shape[1] // factor
    expected = full[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
    assert rgb.shape == (-(-2967 // factor), -(-2220 // factor), 3)
    np.testing.assert_allclose(rgb[:h, :w], expected, atol=1e-3)
    # The ragged last row/column average only the pixels that exist.
    np.testing.assert_allclose(rgb[h, 0], full[h * factor :, :factor].mean(axis=(0, 1)), atol=1e-3)
    assert ds == (float(factor), float(factor))


def test_polygons_outline_the_sample_tissue(sample, sample_mask):
    polys = sample_mask.polygons()
    assert len(polys) == 1  # one connected piece of tissue once specks are dropped
    poly = polys[0]
    assert poly.shape[1] == 2 and np.array_equal(poly[0], poly[-1])
    assert points_in_poly(np.array(TISSUE_POINTS, float), poly).all()
    assert not points_in_poly(np.array(GLASS_POINTS, float), poly).any()
    w, h = sample.dimensions
    assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= w
    assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= h
    simple = sample_mask.polygons(simplify_um=20)[0]
    assert 4 <= len(simple) < len(poly)


def test_fractions_are_exact_area_weights():
    mask = np.zeros((4, 5), bool)
    mask[1, 1] = mask[1, 2] = mask[2, 1] = True
    m = TissueMask(mask, (10.0, 10.0), (50, 40), (0.5, 0.5))
    # Box x 15..35, y 5..25: covers half of (1,1) in x and y -> quarter, etc.
    # pixel (row 1, col 1): x 10-20, y 10-20 -> overlap 5 x 10 = 50
    # pixel (row 1, col 2): x 20-30 -> overlap 10 x 10 = 100
    # pixel (row 2, col 1): y 20-30 -> overlap 5 x 5 = 25; total 175 of 20 x 20 = 400
    assert m.fraction_in(15, 5, 20, 20) == pytest.approx(175 / 400)
    assert m.fraction_in(10, 10, 20, 10) == pytest.approx(1.0)
    assert m.fraction_in(0, 0, 10, 10) == 0.0
    # Outside the slide counts as glass: a box half beyond the right edge.
    full = TissueMask(np.ones((4, 5), bool), (10.0, 10.0), (50, 40), (0.5, 0.5))
    assert full.fraction_in(40, 0, 20, 10) == pytest.approx(0.5)
    xs = np.array([15, 10, 0, 3.3])
    ys = np.array([5, 10, 0, 7.7])
    vec = m.fractions(xs, ys, 20, 20)
    loop = [m.fraction_in(x, y, 20, 20) for x, y in zip(xs, ys, strict=True)]
    np.testing.assert_allclose(vec, loop)


def test_area_clips_edge_pixels_and_polygons_scale_to_level0():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:3] = True
    mask[3, 4] = True  # the bottom-right pixel hangs over the slide edge
    m = TissueMask(mask, (10.0, 10.0), (45, 35), (0.5, 0.5))
    # 4 whole pixels (100 px2 each) + the corner clipped to 5 x 5 px; 0.25 um2 per px2
    assert m.area_mm2 == pytest.approx((400 + 25) * 0.25 / 1e6)
    polys = sorted(m.polygons(), key=len, reverse=True)
    assert len(polys) == 2
    square = polys[0]
    assert square[:, 0].min() == pytest.approx(10, abs=5) and square[:, 0].max() == pytest.approx(30, abs=5)
    assert square[:, 1].min() == pytest.approx(10, abs=5) and square[:, 1].max() == pytest.approx(30, abs=5)
    assert polys[1][:, 0].max() <= 45 and polys[1][:, 1].max() <= 35


def test_glass_only_slide_finds_nothing(tmp_path):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(243, 2.5, size=(1024, 1536, 3)), 0, 255).astype(np.uint8)
    glass[:60] = 0  # a black scanner border: its saturation is noise and must not count
    glass[:, -40:] = 3
    path = write_pyramid(tmp_path / "glass.tif", glass, levels=2, mpp=0.5, compression="jpeg")
    with open_slide(path) as slide:
        m = detect_tissue(slide)
    assert not m.mask.any()
    assert m.area_mm2 == 0.0
    assert m.threshold == OTSU_MIN
    assert m.polygons() == []


def test_tissue_on_glass_is_found_where_it_was_put(tmp_path):
    img = np.full((1536, 2048, 3), 242, np.uint8)
    img[400:1200, 600:1400] = he_image(800, 800, x=700, y=2100)  # dense dermis of the sample
    path = write_pyramid(tmp_path / "patch.tif", img, levels=3, mpp=0.5)
    with open_slide(path) as slide:
        m = detect_tissue(slide)
    assert m.fraction_in(700, 500, 600, 600) > 0.97
    assert m.fraction_in(0, 0, 500, 1536) == 0.0
    assert m.fraction_in(1500, 0, 548, 1536) == 0.0
    # 800 x 800 px at 0.5 um/px = 0.16 mm2, within the mask's 8 um rim
    assert m.area_mm2 == pytest.approx(0.16, rel=0.1)


def test_explicit_threshold_and_params_round_trip(sample):
    strict = detect_tissue(sample, TissueParams(saturation_threshold=0.5))
    default = detect_tissue(sample)
    assert strict.threshold == 0.5
    assert strict.area_mm2 < 0.5 * default.area_mm2
    p = TissueParams(mask_mpp=4.0, closing_um=10, max_hole_um2=None)
    assert TissueParams.from_dict(p.to_dict()) == p
    assert p.to_dict()["closing_um"] == 10.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mask_mpp": 0}, "mask_mpp"),
        ({"saturation_threshold": 1.5}, "saturation_threshold"),
        ({"min_value": 200, "max_value": 100}, "max_value"),
        ({"closing_um": -1}, "closing_um"),
        ({"min_area_um2": float("nan")}, "min_area_um2"),
        ({"fill_holes": "yes"}, "fill_holes"),
    ],
)
def test_bad_params_name_the_parameter(kwargs, name):
    with pytest.raises(ParameterError, match=name):
        TissueParams(**kwargs)


def test_unknown_param_in_dict_is_refused():
    with pytest.raises(ParameterError, match="saturation"):
        TissueParams.from_dict({"saturation": 0.1})


def test_slide_without_mpp_needs_one(tmp_path):
    path = write_pyramid(tmp_path / "nompp.tif", he_image(512, 512, x=900, y=1500),
                         levels=1, mpp=None)
    with open_slide(path) as slide, pytest.raises(SlideError, match="mpp"):
        detect_tissue(slide)
    with open_slide(path, mpp=0.5) as slide:
        assert detect_tissue(slide).mask.any()
