"""ROI selection and in-slide similarity search on hand-built grids and planted neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from napari_gpfm.analysis.geometry import (
    Roi,
    boxes_touching_polygon,
    points_in_polygon,
    tile_boxes,
)
from napari_gpfm.analysis.search import (
    EMPTY_ROI_MESSAGE,
    normalize,
    query_vector,
    search_similar,
    similarity,
    tiles_in_roi,
    top_k,
)
from napari_gpfm.errors import GPFMError, ParameterError

TILE = 100.0


def grid(cols: int = 5, rows: int = 4, step: float = TILE) -> np.ndarray:
    """Row-major grid of tile top-lefts: tile index = row * cols + col."""
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.column_stack([xs.ravel() * step, ys.ravel() * step]).astype(np.int64)


def index(col: int, row: int, cols: int = 5) -> int:
    return row * cols + col


# ---------------------------------------------------------------- ROI selection


def test_rectangle_selects_tiles_by_centre():
    coords = grid()
    # Centres sit at 50, 150, 250...; x in [150, 350) holds 150 and 250, y in [50, 150) holds 50.
    got = tiles_in_roi(coords, TILE, Roi.rectangle(150, 50, 200, 100))
    assert got.tolist() == [index(1, 0), index(2, 0)]
    assert got.dtype == np.int64


def test_rectangle_is_half_open_so_neighbours_never_share_a_tile():
    coords = grid()
    left = set(tiles_in_roi(coords, TILE, (0, 0, 150, 400)).tolist())
    right = set(tiles_in_roi(coords, TILE, (150, 0, 350, 400)).tolist())
    assert left.isdisjoint(right)
    assert left | right == set(range(20))
    assert left == {index(c, r) for c in (0,) for r in range(4)}


def test_concave_polygon_selection_is_exact():
    coords = grid()
    l_shape = [(0, 0), (300, 0), (300, 100), (100, 100), (100, 300), (0, 300)]
    got = tiles_in_roi(coords, TILE, Roi.polygon(l_shape))
    assert got.tolist() == sorted([index(0, 0), index(1, 0), index(2, 0), index(0, 1), index(0, 2)])
    closed = tiles_in_roi(coords, TILE, np.array([*l_shape, l_shape[0]]))
    assert closed.tolist() == got.tolist()


def test_polygon_equal_to_rectangle_selects_the_same_tiles():
    coords = grid(13, 11, step=37)
    rect = (61, 45, 233, 190)
    x, y, w, h = rect
    poly = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    a = tiles_in_roi(coords, 37, rect)
    b = tiles_in_roi(coords, 37, poly)
    assert len(a) > 10
    assert a.tolist() == b.tolist()


def test_point_in_polygon_on_a_circle_over_many_blocks():
    rng = np.random.default_rng(1)
    angles = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    radius = 1000.0
    circle = np.column_stack([np.cos(angles), np.sin(angles)]) * radius + 2000.0
    pts = rng.uniform(500, 3500, size=(30_000, 2))
    r = np.hypot(pts[:, 0] - 2000, pts[:, 1] - 2000)
    inside = points_in_polygon(pts, circle)
    surely_in = r < radius * np.cos(np.pi / 400) - 1e-6
    surely_out = r > radius + 1e-6
    assert np.all(inside[surely_in])
    assert not np.any(inside[surely_out])
    assert surely_in.sum() > 5000 and surely_out.sum() > 5000


def test_self_intersecting_polygon_uses_even_odd_rule():
    # A bow-tie: two triangles meeting at (200, 200); the centre point is on the crossing.
    bow = [(0, 0), (400, 400), (400, 0), (0, 400)]
    pts = np.array([[50, 200], [350, 200], [200, 50], [200, 350]], dtype=float)
    assert points_in_polygon(pts, np.array(bow, dtype=float)).tolist() == [
        True,
        True,
        False,
        False,
    ]


def test_boxes_touching_a_polygon_include_ones_crossed_by_an_edge_alone():
    # An L-shaped (concave) polygon: the notch at the top right is outside.
    ell = np.array([(0, 0), (100, 0), (100, 40), (40, 40), (40, 100), (0, 100)], dtype=float)
    boxes = np.array([
        [10, 10, 20, 20],       # inside
        [60, 60, 90, 90],       # in the notch: outside
        [90, 30, 110, 50],      # over the corner at (100, 40): centre outside, vertex inside
        [30, 45, 50, 200],      # crossed by the edge x = 40 only: no vertex in it, centre out
        [-50, -50, 300, 300],   # holds the whole polygon
        [101, 0, 120, 10],      # right of it
        [41, 41, 99, 99],       # fills the notch without touching it
    ], dtype=float)
    assert boxes_touching_polygon(boxes, ell).tolist() == [
        True, False, True, True, True, False, False]
    # Against a dense test of each box's points, on random boxes: no box with a point inside
    # is missed (what holding evaluation tiles out of training needs), and a box is called
    # touching without such a point only where the overlap is thinner than the sampling.
    rng = np.random.default_rng(0)
    xy = rng.uniform(-20, 120, size=(300, 2))
    random_boxes = np.concatenate([xy, xy + rng.uniform(1, 30, size=(300, 2))], axis=1)
    u, v = (g.ravel() for g in np.meshgrid(np.linspace(0, 1, 41), np.linspace(0, 1, 41)))
    sampled = np.array([
        points_in_polygon(np.stack([b[0] + u * (b[2] - b[0]), b[1] + v * (b[3] - b[1])], 1),
                          ell).any()
        for b in random_boxes])
    touching = boxes_touching_polygon(random_boxes, ell)
    assert not (sampled & ~touching).any()
    assert sampled.sum() > 60 and (touching & ~sampled).sum() <= 3
    assert not boxes_touching_polygon(np.zeros((0, 4)), ell).size


def test_point_selects_the_nearest_tile_and_nothing_far_away():
    coords = grid()
    assert tiles_in_roi(coords, TILE, Roi.point(260, 140)).tolist() == [index(2, 1)]
    assert tiles_in_roi(coords, TILE, (499, 399)).tolist() == [index(4, 3)]
    far = Roi.point(5000, 5000)
    assert tiles_in_roi(coords, TILE, far).size == 0
    assert tiles_in_roi(coords, TILE, far, max_point_distance_l0=np.inf).tolist() == [index(4, 3)]


def test_bad_rois_raise_parameter_errors():
    with pytest.raises(ParameterError, match="w, h > 0"):
        Roi.rectangle(0, 0, 0, 10)
    with pytest.raises(ParameterError, match=r"no area \(its 2 distinct vertices lie on a line"):
        Roi.polygon([(0, 0), (10, 10), (0, 0)])
    with pytest.raises(ParameterError, match=r"no area \(it is a single point\)"):
        Roi.polygon([(5, 5)] * 4)  # a box drawn with a click instead of a drag
    with pytest.raises(ParameterError, match="its 3 distinct vertices lie on a line"):
        Roi.polygon([(0, 0), (5, 5), (10, 10), (0, 0)])
    assert Roi.polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # a bow-tie: signed area 0
    with pytest.raises(ParameterError, match="shape"):
        Roi.coerce(np.zeros((2, 3)))
    with pytest.raises(ParameterError, match="coords"):
        tiles_in_roi(np.zeros((4, 3)), TILE, (0, 0, 10, 10))


def test_tile_boxes():
    boxes = tile_boxes(np.array([[10, 20], [30, 40]]), 224.0)
    assert boxes.tolist() == [[10, 20, 224, 224], [30, 40, 224, 224]]


# ---------------------------------------------------------------- vectors and ranking


def test_normalize_gives_unit_float32_rows_and_keeps_zero_rows():
    feats = np.array([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]])
    out = normalize(feats)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0], [-1, 0]], atol=1e-7)
    assert feats[0, 0] == 3.0  # input untouched
    with pytest.raises(ParameterError, match="tile 1"):
        normalize(np.array([[1.0, 0.0], [np.nan, 1.0]]))


def test_query_vector_weighs_every_tile_equally():
    feats = np.array([[10.0, 0.0], [0.0, 0.1], [5.0, 5.0]])
    q = query_vector(feats, [0, 1])
    np.testing.assert_allclose(q, [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)
    with pytest.raises(ParameterError) as err:
        query_vector(feats, [])
    assert str(err.value) == EMPTY_ROI_MESSAGE
    assert isinstance(err.value, GPFMError)


def test_top_k_matches_a_full_sort_and_handles_exclusions_ties_and_nans():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(1000).astype(np.float32)
    idx, vals = top_k(scores, 25)
    expected = np.argsort(-scores, kind="stable")[:25]
    assert idx.tolist() == expected.tolist()
    np.testing.assert_array_equal(vals, scores[expected])

    excluded = expected[:5]
    idx, _ = top_k(scores, 10, exclude=excluded)
    assert idx.tolist() == expected[5:15].tolist()

    tied = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.5])
    idx, vals = top_k(tied, 3)
    assert idx.tolist() == [1, 0, 2]
    assert vals.tolist() == [0.9, 0.5, 0.5]

    with_nan = np.array([np.nan, 0.2, 0.3])
    idx, _ = top_k(with_nan, 5)
    assert idx.tolist() == [2, 1]

    with pytest.raises(ParameterError, match="k=0"):
        top_k(scores, 0)


def test_similarity_checks_dimensions():
    with pytest.raises(ParameterError, match="same encoder"):
        similarity(np.zeros((3, 8), np.float32), np.zeros(4, np.float32))


def test_search_50k_by_1024_finds_the_planted_neighbours():
    rng = np.random.default_rng(42)
    n, d = 50_000, 1024
    feats = rng.standard_normal((n, d), dtype=np.float32)
    query_tile = 31_337
    planted = np.array([7, 12_345, 49_999, 20_000, 3])
    noise = np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32)[:, None]
    feats[planted] = feats[query_tile] + noise * rng.standard_normal((5, d), dtype=np.float32)

    normed = normalize(feats)
    q = query_vector(normed, [query_tile])
    scores = similarity(normed, q)
    idx, vals = top_k(scores, 10, exclude=[query_tile])

    assert idx[:5].tolist() == planted.tolist()  # ordered by decreasing similarity
    naive = np.argsort(-(feats @ feats[query_tile]) / np.linalg.norm(feats, axis=1))
    naive = naive[naive != query_tile][:10]
    assert idx.tolist() == naive.tolist()
    assert np.all(np.diff(vals) <= 0)


def test_search_similar_on_a_two_texture_grid():
    coords = grid(10, 6)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 32))
    left = coords[:, 0] < 500
    feats = np.where(left[:, None], a, b) + 0.05 * rng.standard_normal((len(coords), 32))
    result = search_similar(normalize(feats), coords, TILE, (0, 0, 200, 200), k=15)
    assert result.query_indices.tolist() == [0, 1, 10, 11]
    assert len(result) == 15
    assert not set(result.indices.tolist()) & set(result.query_indices.tolist())
    assert np.all(left[result.indices])  # 30 left tiles minus 4 query tiles are all closer
    np.testing.assert_array_equal(result.boxes[:, :2], coords[result.indices])
    assert np.all(result.boxes[:, 2:] == TILE)
    rows = result.rows()
    assert rows[0]["rank"] == 1 and rows[0]["tile"] == int(result.indices[0])

    with pytest.raises(ParameterError, match="no embedded tile"):
        search_similar(normalize(feats), coords, TILE, (5000, 5000, 10, 10))
    with pytest.raises(ParameterError, match="same embedding store"):
        search_similar(normalize(feats), coords[:-1], TILE, (0, 0, 200, 200))
