"""QuPath-compatible GeoJSON: round trips, QuPath export variants, tiles and errors."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from napari_gpfm.analysis.geojson import (
    read_geojson,
    shapes_to_geojson,
    tiles_to_geojson,
    write_geojson,
)
from napari_gpfm.analysis.geometry import Roi, tiles_in_roi
from napari_gpfm.errors import ParameterError


def test_round_trip_keeps_polygons_classes_colours_and_measurements(tmp_path):
    triangle = np.array([[10.5, 20.0], [300.0, 25.0], [150.0, 400.25]])
    rectangle = (1000, 2000, 224, 448)
    hexagon = Roi.polygon(
        [(5000 + 100 * np.cos(a), 100 * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    )
    obj = shapes_to_geojson(
        [triangle, rectangle, hexagon],
        classes=["Tumor", "Stroma", None],
        colours=[(200, 0, 0), "#00ff7f", None],
        measurements=[{"score": 0.75, "tiles": 12}, {"score": float("nan")}, {}],
        names=["t1", None, None],
    )
    path = write_geojson(tmp_path / "shapes.geojson", obj)
    raw = json.loads(path.read_text())
    assert raw["type"] == "FeatureCollection" and len(raw["features"]) == 3
    ids = [f["id"] for f in raw["features"]]
    assert len(set(ids)) == 3 and all(uuid.UUID(i).version == 4 for i in ids)
    ring = raw["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 4
    props = raw["features"][0]["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert props["measurements"] == {"score": 0.75, "tiles": 12}
    assert "measurements" not in raw["features"][1]["properties"]  # NaN is left out
    assert "classification" not in raw["features"][2]["properties"]

    back = read_geojson(path)
    assert len(back) == 3
    np.testing.assert_array_equal(back[0].polygon, triangle)
    np.testing.assert_array_equal(
        back[1].polygon, [[1000, 2000], [1224, 2000], [1224, 2448], [1000, 2448]]
    )
    np.testing.assert_allclose(back[2].polygon, hexagon.vertices)
    assert [a.class_name for a in back] == ["Tumor", "Stroma", None]
    assert [a.colour for a in back] == [(200, 0, 0), (0, 255, 127), None]
    assert back[0].measurements == {"score": 0.75, "tiles": 12.0}
    assert back[0].name == "t1" and back[0].object_type == "annotation"


def test_classes_without_colours_get_one_palette_colour_per_class():
    obj = shapes_to_geojson([(0, 0, 10, 10)] * 3, classes=["a", "b", "a"])
    colours = [f["properties"]["classification"]["color"] for f in obj["features"]]
    assert colours[0] == colours[2] != colours[1]
    by_class = shapes_to_geojson(
        [(0, 0, 10, 10)] * 2, classes=["a", "b"], colours={"a": "#010203", "b": (4, 5, 6)}
    )
    assert [f["properties"]["classification"]["color"] for f in by_class["features"]] == [
        [1, 2, 3],
        [4, 5, 6],
    ]


def test_reads_a_qupath_style_feature_list(tmp_path):
    qupath_export = [
        {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [
                        [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
                        [[40, 40], [60, 40], [60, 60], [40, 40]],
                    ],
                    [[[500, 500], [600, 500], [600, 600], [500, 500]]],
                ],
            },
            "properties": {
                "object_type": "annotation",
                "isLocked": False,
                # Java's packed ARGB int for opaque (255, 0, 128) is negative.
                "classification": {"name": "Necrosis", "colorRGB": -65408},
                "measurements": [{"name": "Area µm^2", "value": 2500.0}],
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [5, 1], [5, 5], [1, 1]]]},
            "properties": {"objectType": "detection", "color": [1, 2, 3]},
        },
    ]
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(qupath_export), encoding="utf-8")
    anns = read_geojson(path)
    assert len(anns) == 3
    assert [a.class_name for a in anns] == ["Necrosis", "Necrosis", None]
    assert anns[0].colour == (255, 0, 128)
    assert anns[0].holes_dropped == 1 and anns[1].holes_dropped == 0
    assert anns[0].measurements == {"Area µm^2": 2500.0}
    np.testing.assert_array_equal(anns[1].polygon, [[500, 500], [600, 500], [600, 600]])
    assert anns[2].object_type == "detection" and anns[2].colour == (1, 2, 3)


def test_single_feature_and_bare_polygon_are_accepted(tmp_path):
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
        "properties": {"classification": {"name": "x", "color": [9, 8, 7]}},
    }
    (tmp_path / "one.json").write_text(json.dumps(feature))
    (tmp_path / "geom.json").write_text(json.dumps(feature["geometry"]))
    assert read_geojson(tmp_path / "one.json")[0].colour == (9, 8, 7)
    assert read_geojson(tmp_path / "geom.json")[0].class_name is None


def test_unsupported_geometry_names_the_file_and_type(tmp_path):
    path = tmp_path / "lines.geojson"
    line = {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [line]}))
    with pytest.raises(ParameterError) as err:
        read_geojson(path)
    message = str(err.value)
    assert str(path) in message and "'LineString'" in message and "feature 0" in message


def test_bad_files_raise_one_line_parameter_errors(tmp_path):
    with pytest.raises(ParameterError, match="not found"):
        read_geojson(tmp_path / "missing.geojson")
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(ParameterError, match=r"broken.geojson is not valid JSON \(line 1"):
        read_geojson(tmp_path / "broken.geojson")
    (tmp_path / "topo.json").write_text('{"type": "Topology"}')
    with pytest.raises(ParameterError, match="'Topology' is not supported"):
        read_geojson(tmp_path / "topo.json")
    degenerate = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}
    (tmp_path / "thin.json").write_text(json.dumps(degenerate))
    with pytest.raises(ParameterError, match="fewer than 3 distinct"):
        read_geojson(tmp_path / "thin.json")
    with pytest.raises(ParameterError, match="point cannot be written"):
        shapes_to_geojson([Roi.point(1, 2)])
    with pytest.raises(ParameterError, match="objectType"):
        shapes_to_geojson([(0, 0, 1, 1)], object_type="blob")


def test_tiles_to_geojson_writes_square_tiles_with_measurements(tmp_path):
    coords = np.array([[0, 0], [224, 0], [0, 224]])
    obj = tiles_to_geojson(
        coords,
        224,
        measurements={"p_tumour": np.array([0.9, np.nan, 0.1]), "cluster": np.array([2, 0, 1])},
        classes=np.array([1, 0, 1]),
        class_names=["stroma", "tumour"],
        colours=np.array([[0, 0, 255], [255, 0, 0]]),
    )
    features = obj["features"]
    assert len(features) == 3
    assert features[1]["geometry"]["coordinates"][0] == [
        [224.0, 0.0],
        [448.0, 0.0],
        [448.0, 224.0],
        [224.0, 224.0],
        [224.0, 0.0],
    ]
    props = [f["properties"] for f in features]
    assert all(p["objectType"] == "tile" for p in props)
    assert props[0]["measurements"] == {"p_tumour": 0.9, "cluster": 2}
    assert props[1]["measurements"] == {"cluster": 0}
    assert props[0]["classification"] == {"name": "tumour", "color": [255, 0, 0]}
    assert props[1]["classification"] == {"name": "stroma", "color": [0, 0, 255]}

    path = write_geojson(tmp_path / "tiles.geojson", obj)
    anns = read_geojson(path)
    assert [a.object_type for a in anns] == ["tile"] * 3
    # Reading the tiles back and selecting with them returns exactly those tiles.
    for i, ann in enumerate(anns):
        assert tiles_in_roi(coords, 224, ann.to_roi()).tolist() == [i]
    with pytest.raises(ParameterError, match="3 shapes"):
        tiles_to_geojson(coords, 224, measurements={"x": [1, 2]})


def test_write_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.geojson"
    write_geojson(path, shapes_to_geojson([(0, 0, 5, 5)], classes=["keep"]))
    before = path.read_text()
    with pytest.raises(ParameterError, match="cannot write GeoJSON"):
        write_geojson(path, {"type": "FeatureCollection", "features": [{"x": float("nan")}]})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson"]
    with pytest.raises(ParameterError, match="does not exist"):
        write_geojson(tmp_path / "no" / "such.geojson", {})
