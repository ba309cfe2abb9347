"""QuPath GeoJSON writers and reader through the viewer: save, open, and where shapes land."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_gpfm.errors import GPFMError  # noqa: E402
from napari_gpfm.napari._session import (  # noqa: E402
    OVERLAY_KEY,
    SlideRef,
    reset_sessions,
    session_for,
)


@pytest.fixture
def slide_viewer(make_napari_viewer_proxy):
    reset_sessions()
    viewer = make_napari_viewer_proxy()
    [slide] = viewer.open_sample("napari-gpfm", "cmu_small_region")
    yield viewer, SlideRef.from_layer(slide)
    reset_sessions()


def _world(ref, xy):
    return ref.level0_to_world(np.asarray(xy, dtype=np.float64))


def test_shapes_round_trip_through_qupath_geojson(slide_viewer, tmp_path, messages):
    from napari_gpfm.analysis.geojson import read_geojson

    viewer, ref = slide_viewer
    # Shapes drawn in a plain napari layer in world micrometres (scale 1): the writer finds
    # the slide (the only one open) to convert them to level-0 pixels.
    rect_l0 = np.array([[400.0, 600.0], [700.0, 600.0], [700.0, 900.0], [400.0, 900.0]])
    poly_l0 = np.array([[1000.0, 1200.0], [1300.0, 1250.0], [1150.0, 1500.0]])
    ellipse_l0 = np.array([[200.0, 2000.0], [600.0, 2000.0], [600.0, 2200.0], [200.0, 2200.0]])
    line_l0 = np.array([[100.0, 100.0], [300.0, 300.0]])
    data = [_world(ref, s) for s in (rect_l0, poly_l0, ellipse_l0, line_l0)]
    layer = viewer.add_shapes(
        data,
        shape_type=["rectangle", "polygon", "ellipse", "line"],
        edge_color=["#ff0000", "#00ff00", "#0000ff", "#ffffff"],
        features={"class": ["tumour", "stroma", "tumour", ""], "score": [0.5, 1.5, 2.5, 3.5]},
        name="annotations",
        units=("um", "um"),
    )
    path = tmp_path / "annotations.geojson"
    viewer.layers.selection = {layer}
    viewer.layers.save(str(path), selected=True, plugin="napari-gpfm")
    assert any("1 line/path shape(s)" in m for m in messages)

    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    gpfm = doc["properties"]["gpfm"]
    assert gpfm["slide"]["fingerprint"] == ref.fingerprint
    first = doc["features"][0]["properties"]
    assert first["objectType"] == "annotation"
    assert first["classification"] == {"name": "tumour", "color": [255, 0, 0]}
    assert first["measurements"] == {"score": 0.5}
    # coordinates are level-0 pixels
    annotations = read_geojson(path)
    np.testing.assert_allclose(annotations[0].polygon, rect_l0, atol=1e-6)
    np.testing.assert_allclose(annotations[1].polygon, poly_l0, atol=1e-6)
    ell = annotations[2].polygon
    assert len(ell) == 64
    np.testing.assert_allclose(ell.min(axis=0), [200.0, 2000.0], atol=1.0)
    np.testing.assert_allclose(ell.max(axis=0), [600.0, 2200.0], atol=1.0)

    # Read back through the viewer: same places on the slide, same classes and colours.
    [back] = viewer.open(str(path), plugin="napari-gpfm")
    assert back.name.startswith("annotations") and len(back.data) == 3
    assert list(back.shape_type) == ["rectangle", "polygon", "polygon"]
    assert list(back.features["class"]) == ["tumour", "stroma", "tumour"]
    np.testing.assert_allclose(back.features["score"], [0.5, 1.5, 2.5])
    np.testing.assert_allclose(np.asarray(back.edge_color)[1], [0, 1, 0, 1])
    assert back.metadata[OVERLAY_KEY]["slide"]["fingerprint"] == ref.fingerprint
    for original, again in ((data[0], back.data[0]), (data[1], back.data[1])):
        world = np.array([back.data_to_world(p) for p in again])
        np.testing.assert_allclose(world, original, atol=1e-4)

    # Saved again from the read layer (which records its slide), the file is unchanged.
    again = tmp_path / "again.geojson"
    viewer.layers.selection = {back}
    viewer.layers.save(str(again), selected=True, plugin="napari-gpfm")
    for a, b in zip(read_geojson(path), read_geojson(again), strict=True):
        np.testing.assert_allclose(a.polygon, b.polygon, atol=1e-6)
        assert (a.class_name, a.colour) == (b.class_name, b.colour)


def test_reader_places_qupath_files_on_the_open_slide(slide_viewer, tmp_path, messages):
    viewer, ref = slide_viewer
    # A QuPath export: a bare list of features, packed colours, pre-0.4 measurement list.
    qupath = [
        {
            "type": "Feature",
            "id": "a",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[100, 200], [500, 200], [500, 600], [100, 600],
                                          [100, 200]]]},
            "properties": {"objectType": "annotation",
                           "classification": {"name": "Tumor", "colorRGB": -3670016},
                           "measurements": [{"name": "Area µm^2", "value": 39840.1}]},
        }
    ]
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(qupath))
    [layer] = viewer.open(str(path), plugin="napari-gpfm")
    assert any("placed on the open slide" in m for m in messages)
    assert list(layer.features["class"]) == ["Tumor"]
    assert layer.features["Area µm^2"][0] == pytest.approx(39840.1)
    corners = np.array([layer.data_to_world(p) for p in layer.data[0]])
    np.testing.assert_allclose(corners.min(axis=0), _world(ref, [[100, 200]])[0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer.edge_color)[0][:3],
                               np.array([200, 0, 0]) / 255, atol=1e-3)


def test_reader_without_a_slide_keeps_level0_pixels(make_napari_viewer_proxy, tmp_path,
                                                     messages):
    viewer = make_napari_viewer_proxy()
    path = tmp_path / "alone.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[10, 20], [30, 20], [30, 60], [10, 20]]]}, "properties": {}}]}))
    [layer] = viewer.open(str(path), plugin="napari-gpfm")
    assert any("level-0 pixels (scale 1)" in m for m in messages)
    assert tuple(layer.scale) == (1.0, 1.0)
    np.testing.assert_allclose(np.asarray(layer.data[0]).min(axis=0), [19.5, 9.5])

    bad = tmp_path / "broken.geojson"
    bad.write_text("{not json")
    with pytest.raises(GPFMError, match="is not valid JSON"):
        viewer.open(str(bad), plugin="napari-gpfm")


def test_tile_map_writer(slide_viewer, tmp_path):
    from napari_gpfm.analysis.geojson import read_geojson
    from napari_gpfm.embedding.store import EmbeddingStore
    from napari_gpfm.napari._overlays import place_layer, score_layer
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    viewer, ref = slide_viewer
    # A real store of the sample holding known features (no encoder needed to write one).
    with open_slide(ref.path) as slide:
        spec = TilingSpec(mpp=2.0, read_size=112, model_size=160)
        grid = make_grid(slide, spec)
        store = EmbeddingStore.create(
            tmp_path / "s.zarr", slide=slide, grid=grid, spec=spec, dtype="float32",
            encoder_meta={"encoder_id": "demo@0", "encoder_name": "demo",
                          "weights_sha256": "0" * 64, "embed_dim": 4},
        )
    n = store.n_tiles
    store.write(np.arange(n), np.arange(n * 4, dtype=np.float32).reshape(n, 4))
    session = session_for(ref)
    session.use_store(store.path)
    tiles = session.tiles()
    values = np.linspace(0.0, 1.0, n)
    layer = place_layer(viewer, score_layer(tiles, values, "demo score", "score", "demo"))

    path = tmp_path / "tiles.geojson"
    viewer.layers.selection = {layer}
    viewer.layers.save(str(path), selected=True, plugin="napari-gpfm")
    written = read_geojson(path)
    assert len(written) == n
    for k in (0, n - 1):
        np.testing.assert_allclose(written[k].polygon.min(axis=0), grid.coords[k])
        assert written[k].object_type == "tile"
        assert written[k].measurements["demo"] == pytest.approx(values[k])
    made_by = json.loads(path.read_text())["properties"]["gpfm"]["made_by"]
    assert made_by["encoder_id"] == "demo@0" and made_by["tiling_id"] == spec.id

    # The slide itself is not a tile map: a clear error, not a half-written file.
    slide_layer = viewer.layers[0]
    viewer.layers.selection = {slide_layer}
    with pytest.raises(GPFMError, match="not a napari-gpfm tile map"):
        viewer.layers.save(str(tmp_path / "slide.geojson"), selected=True, plugin="napari-gpfm")
    assert not (tmp_path / "slide.geojson").exists()
