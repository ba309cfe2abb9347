"""PCA colours, k-means clusters and slide-aligned rasters, on synthetic and real H&E features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_gpfm.analysis.colours import apply_colormap, categorical_colours, colormap_lut
from napari_gpfm.analysis.geometry import tile_area_mm2
from napari_gpfm.analysis.maps import cluster_table, fit_pca_colours, kmeans_clusters, pca_rgb
from napari_gpfm.analysis.rasters import (
    raster_to_rgba,
    read_map_tiff,
    tile_label_raster,
    tile_raster,
    write_map_png,
    write_map_tiff,
)
from napari_gpfm.analysis.search import normalize, query_vector, similarity, tiles_in_roi, top_k
from napari_gpfm.errors import ParameterError

SAMPLE = Path(__file__).resolve().parents[1] / "napari_gpfm" / "data" / "CMU-1-Small-Region.svs"


def three_blobs(sizes=(150, 100, 50), dim=64, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, dim)) * 4.0
    feats = np.vstack(
        [c + rng.standard_normal((n, dim)) for c, n in zip(centres, sizes, strict=True)]
    )
    truth = np.repeat(np.arange(3), sizes)
    perm = rng.permutation(len(truth))
    return feats[perm], truth[perm]


# ---------------------------------------------------------------- PCA colours


def test_pca_rgb_follows_the_main_axis_and_is_deterministic():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((400, 32)) * 0.1
    feats[:, 5] += np.linspace(-10, 10, 400)  # the dominant direction
    rgb = pca_rgb(feats)
    assert rgb.shape == (400, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    # Sign convention: the largest loading is positive, so R rises with feature 5.
    ranks = np.argsort(np.argsort(rgb[:, 0]))
    assert np.corrcoef(ranks, np.arange(400))[0, 1] > 0.99
    np.testing.assert_array_equal(pca_rgb(feats), rgb)
    perm = rng.permutation(400)
    np.testing.assert_allclose(pca_rgb(feats[perm]), rgb[perm], atol=1e-5)


def test_pca_robust_scaling_resists_an_outlier():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 16))
    feats[:, 0] *= 5
    feats[0, 0] = 1e4
    robust = pca_rgb(feats, robust=True)[1:, 0]
    plain = pca_rgb(feats, robust=False)[1:, 0]
    assert robust.std() > 0.2
    assert plain.std() < 0.01


def test_pca_tall_and_wide_solvers_agree():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((40, 64)) @ np.diag(np.linspace(3, 0.1, 64))
    wide = fit_pca_colours(feats)  # N <= D: SVD
    tall = fit_pca_colours(np.vstack([feats, feats]))  # N > D: covariance eigen-solve
    np.testing.assert_allclose(wide.components, tall.components, atol=1e-5)
    assert wide.explained_variance_ratio[0] > wide.explained_variance_ratio[1] > 0


def test_pca_parameter_errors():
    with pytest.raises(ParameterError, match="n_components"):
        pca_rgb(np.zeros((2, 8)), n_components=3)
    with pytest.raises(ParameterError, match="NaN"):
        pca_rgb(np.full((5, 4), np.nan))
    with pytest.raises(ParameterError, match=r"\(N, 8\)"):
        fit_pca_colours(np.random.default_rng(0).random((10, 8))).colours(np.zeros((3, 4)))


# ---------------------------------------------------------------- clusters


def test_kmeans_recovers_three_blobs_numbered_by_size():
    from sklearn.metrics import adjusted_rand_score

    feats, truth = three_blobs()
    result = kmeans_clusters(feats, 3, seed=0)
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert np.bincount(result.labels).tolist() == [150, 100, 50]
    assert result.k == 3 and result.centers.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(result.centers, axis=1), 1.0, atol=0.05)
    assert result.colours.shape == (3, 3) and result.colours.dtype == np.uint8
    again = kmeans_clusters(feats, 3, seed=0)
    np.testing.assert_array_equal(again.labels, result.labels)


def test_kmeans_on_a_subset_still_assigns_every_tile():
    from sklearn.metrics import adjusted_rand_score

    feats, truth = three_blobs()
    result = kmeans_clusters(feats, 3, seed=4, max_fit_tiles=60)
    assert result.labels.shape == (300,)
    assert adjusted_rand_score(truth, result.labels) == 1.0


def test_kmeans_k_is_validated():
    feats, _ = three_blobs()
    for bad in (1, 301, 2.5):
        with pytest.raises(ParameterError, match="between 2 and the tile count 300"):
            kmeans_clusters(feats, bad)


def test_cluster_table_counts_and_areas():
    area = tile_area_mm2(224, 0.5)  # 112 um side
    assert area == pytest.approx(0.112**2)
    rows = cluster_table(np.array([0, 0, 1, 2, 2, 2]), 3, area)
    assert [r["tiles"] for r in rows] == [2, 1, 3]
    assert rows[2]["area_mm2"] == pytest.approx(3 * 0.012544)
    assert sum(r["fraction"] for r in rows) == pytest.approx(1.0)
    assert rows[0]["colour"] == "#1f77b4"
    with pytest.raises(ParameterError):
        cluster_table(np.array([0, 3]), 3, area)
    assert tile_area_mm2(224, 0.5, stride_l0=112) == pytest.approx(0.056**2)


# ---------------------------------------------------------------- rasters


def test_raster_alignment_is_exact_with_an_offset_grid():
    # Tiles of 100 px on a 100 px stride, the grid starting at (37, 11) in a 1000 x 800 slide.
    ys, xs = np.mgrid[0:7, 0:9]
    coords = np.column_stack([37 + xs.ravel() * 100, 11 + ys.ravel() * 100])
    values = np.arange(len(coords), dtype=float)
    r = tile_raster(coords, 100, values, (1000, 800))
    assert r.scale_yx == (100.0, 100.0)
    assert r.translate_yx == (11.0, 37.0)
    assert r.data.shape == (8, 10)  # ceil((800 - 11) / 100), ceil((1000 - 37) / 100)
    k = int(np.flatnonzero((coords[:, 0] == 437) & (coords[:, 1] == 211))[0])
    assert r.cell_of(437, 211) == (2, 4)
    assert r.data[2, 4] == values[k]
    assert np.isnan(r.data[7, 9]) and r.counts[7, 9] == 0
    assert r.counts[:7, :9].min() == 1
    # napari draws pixel i centred on translate + i * scale; the slide's level-0 pixel x is
    # centred on x * mpp. The centre of tile k's pixels must coincide with its cell's centre.
    mpp = 0.25
    t = r.napari_transform(mpp)
    tile_centre_world = (np.array([211, 437]) + (100 - 1) / 2) * mpp
    cell_centre_world = np.array(t["translate"]) + np.array([2, 4]) * np.array(t["scale"])
    np.testing.assert_allclose(cell_centre_world, tile_centre_world)
    assert r.scale_um(mpp) == (25.0, 25.0)
    assert r.translate_um(mpp) == (11 * 0.25, 37 * 0.25)


def test_overlapping_tiles_are_averaged_per_cell():
    # 200 px tiles on a 100 px stride: each tile covers 2 x 2 cells.
    ys, xs = np.mgrid[0:3, 0:3]
    coords = np.column_stack([xs.ravel() * 100, ys.ravel() * 100])
    values = np.arange(9, dtype=float)  # value = row * 3 + col
    r = tile_raster(coords, 200, values, (400, 400), stride_l0=100)
    assert r.data.shape == (4, 4)
    # Cell (1, 1) lies under tiles (0,0), (0,1), (1,0), (1,1): values 0, 1, 3, 4.
    assert r.data[1, 1] == pytest.approx(np.mean([0, 1, 3, 4]))
    assert r.counts[1, 1] == 4 and r.counts[0, 0] == 1 and r.counts[3, 3] == 1
    assert r.data[3, 3] == 8.0
    # NaN values are skipped, not propagated.
    values[4] = np.nan
    r2 = tile_raster(coords, 200, values, (400, 400), stride_l0=100)
    assert r2.data[1, 1] == pytest.approx(np.mean([0, 1, 3]))
    assert r2.data[2, 2] == pytest.approx(np.mean([5, 7, 8]))
    multi = tile_raster(
        coords, 200, np.column_stack([np.arange(9), -np.arange(9)]), (400, 400), 100
    )
    assert multi.data.shape == (4, 4, 2)
    assert multi.data[1, 1].tolist() == [2.0, -2.0]


def test_label_raster_votes_and_marks_empty_cells():
    coords = np.array([[0, 0], [100, 0], [0, 100], [100, 100]])
    labels = np.array([2, 2, 1, 0])
    r = tile_label_raster(coords, 200, labels, 3, (300, 300), stride_l0=100)
    assert r.data.dtype == np.int32
    # Cell (1, 1) sees labels 2, 2, 1, 0 -> 2 wins; the corner (2, 2) only sees tile 3 -> 0.
    assert r.data[1, 1] == 2 and r.data[2, 2] == 0 and r.data[0, 0] == 2
    sparse = tile_label_raster(coords[:1], 100, labels[:1], 3, (300, 300))
    assert sparse.data[0, 0] == 2 and sparse.data[2, 2] == -1


def test_raster_parameter_errors():
    with pytest.raises(ParameterError, match="values must have shape"):
        tile_raster(np.zeros((3, 2)), 10, np.zeros(4), (100, 100))
    with pytest.raises(ParameterError, match="tile_size_l0"):
        tile_raster(np.zeros((3, 2)), 0, np.zeros(3), (100, 100))
    with pytest.raises(ParameterError, match="slide_dims"):
        tile_raster(np.zeros((3, 2)), 10, np.zeros(3), (0, 100))


def test_colour_maps():
    lut = colormap_lut("viridis")
    assert lut.shape == (256, 3)
    assert tuple(lut[0]) == (0x44, 0x01, 0x54) and tuple(lut[-1]) == (0xFD, 0xE7, 0x25)
    rgb, valid = apply_colormap(np.array([0.0, 0.5, np.nan, 1.0]))
    assert valid.tolist() == [True, True, False, True]
    assert tuple(rgb[3]) == tuple(lut[-1])
    assert len({tuple(c) for c in categorical_colours(40)}) == 40
    with pytest.raises(ParameterError, match="unknown colour map"):
        colormap_lut("jet")


def test_write_map_png_overlays_exactly_on_the_thumbnail(tmp_path):
    # A 1000 x 600 slide, 100 px tiles; only the tile at (400, 200) has a value.
    coords = np.array([[400, 200], [0, 0]])
    r = tile_raster(coords, 100, np.array([1.0, np.nan]), (1000, 600))
    thumb = np.full((60, 100, 3), 200, dtype=np.uint8)  # downsample 10
    out = write_map_png(tmp_path / "map.png", r, thumbnail=thumb, alpha=1.0, vmin=0, vmax=1)
    img = np.asarray(Image.open(out))
    assert img.shape == (60, 100, 3)
    top = colormap_lut("viridis")[-1]
    assert np.all(img[20:30, 40:50] == top)
    untouched = np.ones((60, 100), dtype=bool)
    untouched[20:30, 40:50] = False
    assert np.all(img[untouched] == 200)

    half = np.asarray(Image.open(write_map_png(tmp_path / "h.png", r, thumb, 0.5, vmin=0, vmax=1)))
    np.testing.assert_allclose(half[25, 45], (200 + top.astype(float)) / 2, atol=1)

    bare = np.asarray(Image.open(write_map_png(tmp_path / "bare.png", r)))
    assert bare.shape == (6, 10, 4)
    assert bare[2, 4, 3] == 255 and bare[0, 0, 3] == 0
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ParameterError, match="does not exist"):
        write_map_png(tmp_path / "missing" / "map.png", r)


def test_map_tiff_round_trip_keeps_values_and_grid(tmp_path):
    import tifffile

    coords = np.array([[37, 11], [137, 11], [37, 111]])
    r = tile_raster(coords, 100, np.array([0.25, 0.5, 0.75]), (300, 250))
    path = write_map_tiff(tmp_path / "map.tif", r, mpp=0.5, extra={"what": "score"})
    back = read_map_tiff(path)
    np.testing.assert_array_equal(back.data, r.data)
    assert back.data.dtype == np.float32
    assert back.scale_yx == r.scale_yx and back.translate_yx == r.translate_yx
    assert back.slide_dims == (300, 250)
    with tifffile.TiffFile(path) as tif:
        meta = json.loads(tif.pages[0].description)
        xres = tif.pages[0].tags["XResolution"].value
    assert meta["scale_um_yx"] == [50.0, 50.0] and meta["extra"] == {"what": "score"}
    assert xres[0] / xres[1] == pytest.approx(1e4 / 50.0)  # pixels per cm
    (tmp_path / "plain.tif").write_bytes(b"not a tiff")
    with pytest.raises(ParameterError, match="not a readable TIFF"):
        read_map_tiff(tmp_path / "plain.tif")


def test_rgba_of_pca_and_label_rasters():
    coords = np.array([[0, 0], [10, 0]])
    rgb = tile_raster(coords, 10, np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), (30, 10))
    rgba = raster_to_rgba(rgb)
    assert rgba[0, 0].tolist() == [255, 0, 0, 255]
    assert rgba[0, 1].tolist() == [0, 0, 255, 255]
    assert rgba[0, 2, 3] == 0
    labels = tile_label_raster(coords, 10, np.array([1, 0]), 2, (30, 10))
    colours = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    assert raster_to_rgba(labels, colours=colours)[0, :2, :3].tolist() == [[4, 5, 6], [1, 2, 3]]


# ---------------------------------------------------------------- real H&E sample


def colour_histogram(tile: np.ndarray) -> np.ndarray:
    """8 bins per RGB channel, as fractions of the tile's pixels (24-d)."""
    hist = [np.histogram(tile[..., c], bins=8, range=(0, 256))[0] for c in range(3)]
    return np.concatenate(hist) / float(tile.shape[0] * tile.shape[1])


@pytest.fixture(scope="module")
def he_tiles():
    tiffslide = pytest.importorskip("tiffslide")
    slide = tiffslide.TiffSlide(SAMPLE)
    width, height = slide.dimensions
    coords, feats, white = [], [], []
    for y in range(0, height - 223, 224):
        for x in range(0, width - 223, 224):
            tile = slide.read_region((x, y), 0, (224, 224), as_array=True)[..., :3]
            coords.append((x, y))
            feats.append(colour_histogram(tile))
            white.append(float(np.mean(tile.min(axis=-1) > 200)))
    slide.close()
    white = np.array(white)
    return {
        "coords": np.array(coords, dtype=np.int64),
        "features": np.array(feats),
        "background": white >= 0.97,
        "tissue": white <= 0.5,
        "white": white,
        "dims": (width, height),
    }


def test_real_he_pca_separates_background_from_tissue(he_tiles):
    bg, tissue = he_tiles["background"], he_tiles["tissue"]
    assert bg.sum() >= 20 and tissue.sum() >= 20
    first = pca_rgb(he_tiles["features"])[:, 0]
    assert first[bg].min() > first[tissue].max() or first[bg].max() < first[tissue].min()


def test_real_he_clusters_separate_background_from_tissue(he_tiles):
    bg, tissue = he_tiles["background"], he_tiles["tissue"]
    labels = kmeans_clusters(he_tiles["features"], 2, seed=0).labels
    bg_cluster = np.bincount(labels[bg], minlength=2).argmax()
    assert np.all(labels[bg] == bg_cluster)
    assert np.mean(labels[tissue] != bg_cluster) >= 0.9


def test_real_he_similarity_from_background_ranks_background_first(he_tiles):
    bg, tissue = he_tiles["background"], he_tiles["tissue"]
    coords = he_tiles["coords"]
    normed = normalize(he_tiles["features"])
    first_bg = int(np.flatnonzero(bg)[0])
    x, y = coords[first_bg] + 112
    picked = tiles_in_roi(coords, 224, (x, y))
    assert picked.tolist() == [first_bg]
    scores = similarity(normed, query_vector(normed, picked))
    # Every background tile outranks every tissue tile (near-white tiles may fall in between).
    assert scores[bg].min() > scores[tissue].max()
    idx, _ = top_k(scores, int(bg.sum()) - 1, exclude=picked)
    assert np.mean(bg[idx]) >= 0.9 and not np.any(tissue[idx])
    # And from a tissue tile, the nearest tiles are tissue.
    first_tissue = int(np.flatnonzero(he_tiles["white"] < 0.1)[0])
    scores = similarity(normed, query_vector(normed, [first_tissue]))
    idx, _ = top_k(scores, 15, exclude=[first_tissue])
    assert np.all(tissue[idx])


def test_real_he_raster_places_each_tile_in_its_cell(he_tiles):
    coords, white = he_tiles["coords"], he_tiles["white"]
    r = tile_raster(coords, 224, white, he_tiles["dims"])
    assert r.translate_yx == (0.0, 0.0)
    rows, cols = coords[:, 1] // 224, coords[:, 0] // 224
    np.testing.assert_allclose(r.data[rows, cols], white, rtol=1e-6)
    assert r.data.shape == (int(np.ceil(2967 / 224)), int(np.ceil(2220 / 224)))
