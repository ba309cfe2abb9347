"""Tile grids: exact grid math on hand-computed cases, the tissue filter, the spec, CSV files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from slide_factory import he_image, write_pyramid

from napari_gpfm.errors import ConfigError, ParameterError, SlideError
from napari_gpfm.slides import open_slide
from napari_gpfm.tiling.grid import TileGrid, TilingSpec, make_grid
from napari_gpfm.tiling.tissue import TissueMask, TissueParams

W, H = 1000, 700


@pytest.fixture(scope="module")
def slide_025(tmp_path_factory):
    path = write_pyramid(tmp_path_factory.mktemp("grid") / "s025.tif", he_image(W, H),
                         levels=2, mpp=0.25)
    with open_slide(path) as slide:
        yield slide


@pytest.fixture(scope="module")
def slide_03(tmp_path_factory):
    path = write_pyramid(tmp_path_factory.mktemp("grid") / "s03.tif", he_image(W, H),
                         levels=1, mpp=0.3)
    with open_slide(path) as slide:
        yield slide


def _left_half_mask(width=W, height=H, split=500) -> TissueMask:
    """Tissue on level-0 x < split, glass elsewhere; 10 level-0 px per mask px."""
    mask = np.zeros((height // 10, width // 10), bool)
    mask[:, : split // 10] = True
    return TissueMask(mask, (10.0, 10.0), (width, height), (0.25, 0.25))


def test_grid_math_with_stride_and_overlap(slide_025):
    # 0.5 um/px on a 0.25 um/px scan: 2 level-0 px per tile px; 100 px tiles = 200 level-0 px,
    # stride 60 px = 120 level-0 px (40% overlap). Tiles must fit: x + 200 <= 1000, y + 200 <= 700.
    spec = TilingSpec(mpp=0.5, read_size=100, model_size=100, stride=60, min_tissue=0)
    grid = make_grid(slide_025, spec, tissue_mask=_left_half_mask())
    assert grid.tile_size_l0 == 200.0 and grid.stride_l0 == 120.0
    xs = [0, 120, 240, 360, 480, 600, 720]
    ys = [0, 120, 240, 360, 480]
    expected = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)  # row-major
    assert grid.coords.dtype == np.int64
    np.testing.assert_array_equal(grid.coords, expected)
    assert grid.candidates == 35 and len(grid) == 35
    assert grid.slide_dims == (W, H) and grid.slide_mpp == 0.25
    np.testing.assert_allclose(grid.boxes()[1], [120, 0, 320, 200])


def test_grid_at_a_non_integer_scale(slide_03):
    # 0.5 / 0.3: a 64 px tile is 106.67 level-0 px; starts are round(k * 106.67).
    grid = make_grid(slide_03, TilingSpec(mpp=0.5, read_size=64, model_size=64, min_tissue=0),
                     tissue_mask=_left_half_mask())
    assert grid.tile_size_l0 == pytest.approx(64 * 0.5 / 0.3)
    xs = [0, 107, 213, 320, 427, 533, 640, 747, 853]  # 853 + 106.7 <= 1000; 960 + 106.7 is not
    ys = [0, 107, 213, 320, 427, 533]
    np.testing.assert_array_equal(grid.coords, [(x, y) for y in ys for x in xs])


def test_min_tissue_keeps_tiles_with_enough_tissue(slide_025):
    spec = TilingSpec(mpp=0.5, read_size=100, model_size=100, stride=60, min_tissue=0.5)
    grid = make_grid(slide_025, spec, tissue_mask=_left_half_mask())
    # Tissue ends at x = 500: tiles at x = 0, 120, 240 are all tissue, x = 360 has 140 / 200.
    assert grid.candidates == 35 and len(grid) == 20
    assert set(grid.coords[:, 0].tolist()) == {0, 120, 240, 360}
    np.testing.assert_allclose(grid.tissue_fraction[:4], [1, 1, 1, 0.7])
    strict = make_grid(slide_025, dataclasses.replace(spec, min_tissue=0.75),
                       tissue_mask=_left_half_mask())
    assert len(strict) == 15 and strict.coords[:, 0].max() == 240


def test_sample_grid_keeps_the_tissue_tiles(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        grid = make_grid(slide, TilingSpec())
    # 2220 x 2967 px at 0.499 um/px; 224 px at 0.5 um/px = 224.45 level-0 px: 9 x 13 candidates.
    assert grid.candidates == 9 * 13
    assert 40 <= len(grid) <= 60  # the preview shows ~49 tiles over the tissue
    assert (grid.tissue_fraction >= 0.5).all()
    assert grid.coords[:, 0].min() > 400  # the left third of the slide is glass (bar the strand)


def test_target_finer_than_the_scan_is_refused(slide_025):
    with pytest.raises(ParameterError, match="--mpp 0.22"):
        make_grid(slide_025, TilingSpec(mpp=0.22, min_tissue=0), tissue_mask=_left_half_mask())
    # Within 10% (a 0.2527 scan read at 0.25, say) is allowed.
    grid = make_grid(slide_025, TilingSpec(mpp=0.23, read_size=100, model_size=100, min_tissue=0),
                     tissue_mask=_left_half_mask())
    assert grid.tile_size_l0 == pytest.approx(92.0)


def test_slide_without_mpp_raises_the_slide_error(tmp_path):
    path = write_pyramid(tmp_path / "nompp.tif", he_image(300, 300), levels=1, mpp=None)
    with open_slide(path) as slide, pytest.raises(SlideError, match="mpp"):
        make_grid(slide, TilingSpec())


def test_spec_id_is_stable_and_canonical():
    spec = TilingSpec()
    assert spec.id == TilingSpec(stride=224).id  # None means "the read size"
    assert spec.id == TilingSpec(mpp=0.5, read_size=224, model_size=224, min_tissue=0.5).id
    assert spec.id != TilingSpec(mpp=0.25).id
    assert spec.id != TilingSpec(tissue=TissueParams(closing_um=10)).id
    assert len(spec.id) == 12
    # The id of the default tiling is recorded in stores: a change here orphans them.
    assert spec.id == "ee46696ade4f"


def test_spec_round_trip_and_presets():
    spec = TilingSpec(mpp=1.0, read_size=256, model_size=224, stride=128, min_tissue=0.25,
                      tissue=TissueParams(mask_mpp=16.0))
    again = TilingSpec.from_dict(spec.to_dict())
    assert again == spec and again.id == spec.id
    native = TilingSpec.gpfm_native()
    assert (native.mpp, native.read_size, native.model_size) == (0.5, 256, 224)
    assert native.field_of_view_um == 128.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        native.mpp = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"mpp": 0}, "--mpp"),
        ({"mpp": float("inf")}, "--mpp"),
        ({"read_size": 4}, "--read-size"),
        ({"read_size": 224.5}, "--read-size"),
        ({"model_size": 0}, "--size"),
        ({"stride": 0}, "--stride"),
        ({"min_tissue": 1.5}, "--min-tissue"),
    ],
)
def test_spec_validation_names_the_parameter(kwargs, flag):
    with pytest.raises(ParameterError, match=flag):
        TilingSpec(**kwargs)


def test_csv_round_trip_keeps_the_spec(slide_025, tmp_path):
    spec = TilingSpec(mpp=0.5, read_size=100, model_size=96, stride=60, min_tissue=0.5)
    grid = make_grid(slide_025, spec, tissue_mask=_left_half_mask())
    path = grid.to_csv(tmp_path / "sub" / "coords.csv")
    text = path.read_text()
    assert f'# spec_id: "{spec.id}"' in text and '"read_size": 100' in text
    assert str(slide_025.path.resolve()) in text
    back = TileGrid.from_csv(path)
    np.testing.assert_array_equal(back.coords, grid.coords)
    np.testing.assert_allclose(back.tissue_fraction, grid.tissue_fraction, atol=1e-4)
    assert back.spec == spec and back.spec_id == spec.id
    assert back.tile_size_l0 == grid.tile_size_l0 and back.stride_l0 == grid.stride_l0
    assert back.slide_dims == (W, H) and back.slide_mpp == 0.25
    assert back.candidates == 35 and back.slide_fingerprint == slide_025.fingerprint


def test_csv_errors_are_readable(slide_025, tmp_path):
    grid = make_grid(slide_025, TilingSpec(mpp=0.5, read_size=100, model_size=100, min_tissue=0),
                     tissue_mask=_left_half_mask())
    path = grid.to_csv(tmp_path / "coords.csv")
    with pytest.raises(ConfigError, match="not found"):
        TileGrid.from_csv(tmp_path / "missing.csv")
    other = tmp_path / "other.csv"
    other.write_text("x,y\n1,2\n")
    with pytest.raises(ConfigError, match="not a napari-gpfm tile grid"):
        TileGrid.from_csv(other)
    edited = tmp_path / "edited.csv"
    edited.write_text(path.read_text().replace('"mpp": 0.5', '"mpp": 0.6'))
    with pytest.raises(ConfigError, match="spec_id"):
        TileGrid.from_csv(edited)
    broken = tmp_path / "broken.csv"
    broken.write_text(path.read_text() + "7,8\n")
    with pytest.raises(ConfigError, match="four numbers"):
        TileGrid.from_csv(broken)
