"""`gpfm tiles`: the tissue tiles of the sample, checked against the pixels; options; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from slide_factory import he_image, write_pyramid

from napari_gpfm.cli import main
from napari_gpfm.slides import open_slide
from napari_gpfm.tiling.grid import TileGrid, TilingSpec


def _tile_stats(rgb: np.ndarray) -> tuple[float, float]:
    """(share of coloured, non-white pixels, mean brightness) of a tile."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    saturation = (hi - lo) / np.maximum(hi, 1)
    coloured = (saturation > 0.15) & (rgb.mean(axis=2) < 235)
    return float(coloured.mean()), float(rgb.mean())


@pytest.fixture(scope="module")
def sample_run(sample_slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_tiles")
    csv, png = out / "coords.csv", out / "preview.png"
    code = main(["tiles", str(sample_slide_path), "--out", str(csv), "--preview", str(png)])
    return code, csv, png


def test_sample_tiles_are_tissue_and_background_is_left_out(sample_run, sample_slide_path):
    code, csv, _ = sample_run
    assert code == 0
    grid = TileGrid.from_csv(csv)
    assert grid.spec == TilingSpec() and grid.candidates == 117
    assert 40 <= len(grid) <= 60
    with open_slide(sample_slide_path) as slide:
        kept = set(map(tuple, grid.coords.tolist()))
        for x, y in grid.coords.tolist():
            coloured, brightness = _tile_stats(slide.read_region_mpp((x, y), 224, 0.5))
            assert coloured > 0.3 and brightness < 215, (x, y, coloured, brightness)
        # The 9 x 13 candidates left out hold little or no tissue: mostly glass, by the pixels.
        step = grid.stride_l0
        glass_seen = 0
        for gy in range(13):
            for gx in range(9):
                x, y = round(gx * step), round(gy * step)
                if (x, y) in kept:
                    continue
                coloured, brightness = _tile_stats(slide.read_region_mpp((x, y), 224, 0.5))
                assert coloured < 0.5, (x, y)  # no dense tissue tile was dropped
                glass_seen += coloured < 0.05
        assert glass_seen > 40  # the glass around the tissue was found and excluded


def test_summary_and_preview(sample_run, sample_slide_path, tmp_path, capsys):
    _, csv, png = sample_run
    image = np.asarray(Image.open(png).convert("RGB"))
    assert max(image.shape[:2]) <= 1600
    green = (image[..., 1] > 150) & (image[..., 0] < 60) & (image[..., 2] < 60)
    blue = (image[..., 2] > 200) & (image[..., 0] < 80) & (image[..., 1] < 120)
    assert green.sum() > 500 and blue.sum() > 500
    code = main(["tiles", str(sample_slide_path), "--out", str(tmp_path / "c.csv")])
    text = capsys.readouterr().out
    assert code == 0
    n = len(TileGrid.from_csv(csv))
    assert f"{n} kept of 117" in text and "mm2" in text and TilingSpec().id in text


def test_json_and_tiling_options(sample_slide_path, tmp_path, capsys):
    out = tmp_path / "c.csv"
    code = main(["tiles", str(sample_slide_path), "--out", str(out), "--mpp", "1.0",
                 "--size", "224", "--read-size", "256", "--stride", "128", "--min-tissue", "0.9",
                 "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    spec = TilingSpec(mpp=1.0, read_size=256, model_size=224, stride=128, min_tissue=0.9)
    assert summary["spec_id"] == spec.id and summary["spec"] == spec.to_dict()
    grid = TileGrid.from_csv(out)
    assert grid.spec == spec and summary["tiles"] == len(grid) > 0
    assert (grid.tissue_fraction >= 0.9).all()
    assert grid.tile_size_l0 == pytest.approx(256 * 1.0 / 0.499)
    assert summary["tissue_area_mm2"] == pytest.approx(0.65, abs=0.1)


def test_slide_without_mpp_needs_slide_mpp(tmp_path, capsys):
    path = write_pyramid(tmp_path / "nompp.tif", he_image(1024, 1024, x=700, y=1900),
                         levels=1, mpp=None)
    out = tmp_path / "c.csv"
    assert main(["tiles", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--slide-mpp" in err and not out.exists()
    assert main(["tiles", str(path), "--slide-mpp", "0.5", "--out", str(out)]) == 0
    grid = TileGrid.from_csv(out)
    assert grid.slide_mpp == 0.5 and len(grid) > 0


def test_target_finer_than_scan_and_bad_values_exit_2(sample_slide_path, tmp_path, capsys):
    out = str(tmp_path / "c.csv")
    assert main(["tiles", str(sample_slide_path), "--out", out, "--mpp", "0.25"]) == 2
    assert "--mpp 0.25" in capsys.readouterr().err
    assert main(["tiles", str(sample_slide_path), "--out", out, "--min-tissue", "2"]) == 2
    assert "--min-tissue" in capsys.readouterr().err
    assert main(["tiles", str(sample_slide_path), "--out", out, "--size", "0"]) == 2
    assert "--size 0" in capsys.readouterr().err
    assert main(["tiles", str(sample_slide_path), "--out", out, "--size", "100000"]) == 2
    assert "--size 100000: a tile side must be 8-8192 px" in capsys.readouterr().err
    assert main(["tiles", str(sample_slide_path), "--out", out, "--read-size", "5000"]) == 2
    assert "larger than CMU-1-Small-Region.svs" in capsys.readouterr().err
    assert main(["tiles", str(tmp_path / "missing.svs"), "--out", out]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # refused by the parser, under its flag
        main(["tiles", str(sample_slide_path), "--out", out, "--slide-mpp", "0"])
    assert stopped.value.code == 2
    assert "argument --slide-mpp/--mpp-slide: 0 is not a pixel size" in capsys.readouterr().err
    # Outputs it could not write as asked: refused first, under their own flag or place.
    assert main(["tiles", str(sample_slide_path), "--out", out, "--preview",
                 str(tmp_path / "p.jpg")]) == 2
    assert "--preview" in capsys.readouterr().err and not (tmp_path / "p.jpg").exists()
    a_file = tmp_path / "c.txt"
    a_file.write_text("")
    assert main(["tiles", str(sample_slide_path), "--out", str(a_file / "c.csv")]) == 2
    assert f"cannot make the folder {a_file}" in capsys.readouterr().err


def test_preview_tints_tiles_too_small_to_outline(sample_slide_path, tmp_path):
    from napari_gpfm.tiling.grid import make_grid
    from napari_gpfm.tiling.preview import TILE_COLOUR, TINT, render_preview
    from napari_gpfm.tiling.tissue import detect_tissue

    with open_slide(sample_slide_path) as slide:
        mask = detect_tissue(slide)
        grid = make_grid(slide, TilingSpec(), tissue_mask=mask)
        thumb = slide.thumbnail(40).astype(float)
        # 224 level-0 px tiles on a 40 px preview of a 2967 px slide are 3 px: tinted.
        out = render_preview(slide, grid, None, tmp_path / "small.png", max_size=40)
    image = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert image.shape == thumb.shape
    x, y = grid.coords[len(grid) // 2] + 112  # the centre of a kept tile
    r, c = int(y * 40 / 2967), int(x * 40 / 2967)
    expected = thumb[r, c] * (1 - TINT) + np.asarray(TILE_COLOUR) * TINT
    np.testing.assert_allclose(image[r, c], expected, atol=1.0)
    np.testing.assert_array_equal(image[1, 1], thumb[1, 1])  # glass corner: untouched
