"""QuPath-compatible GeoJSON: annotations and tiles in, annotations and tiles out.

QuPath's schema (its ``PathObjectTypeAdapters``): each Feature has a UUID ``id``, a geometry in
level-0 pixels with the origin at the top-left, and ``properties`` holding ``objectType``
(``annotation``, ``detection``, ``tile``...), an optional ``classification``
``{name, color: [r, g, b]}`` and ``measurements`` as a ``{name: number}`` object. Writing tiles
with measurements lets QuPath draw our scores with *Measure > Show measurement maps*.

Reading keeps the outer ring of each polygon and drops holes: napari Shapes polygons cannot
hold holes, and tiles are assigned to a region by their centre against that outer ring. The
number of holes dropped is kept on each :class:`Annotation`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_gpfm.analysis._io import atomic_write_text
from napari_gpfm.analysis.colours import categorical_colours, hex_to_rgb
from napari_gpfm.analysis.geometry import Roi, as_coords, check_tile_size
from napari_gpfm.errors import ParameterError

OBJECT_TYPES = ("annotation", "detection", "tile", "cell", "tmaCore")

Rgb = tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Annotation:
    """One polygon read from GeoJSON, in level-0 ``(x, y)`` pixels (open ring, ``(M, 2)``)."""

    polygon: np.ndarray
    class_name: str | None = None
    colour: Rgb | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    object_type: str = "annotation"
    name: str | None = None
    holes_dropped: int = 0

    def to_roi(self) -> Roi:
        """The annotation as a polygon :class:`Roi` (for search or probe labels)."""
        return Roi.polygon(self.polygon)


# ----------------------------------------------------------------------------- writing


def _ring(shape: Roi | Sequence | np.ndarray) -> list[list[float]]:
    """A shape as a closed GeoJSON ring; rectangles may be given as ``(x, y, w, h)``."""
    roi = Roi.coerce(shape)
    if roi.kind == "point":
        raise ParameterError("a point cannot be written as a GeoJSON polygon; draw an area")
    pts = roi.vertices.tolist()
    return [*pts, pts[0]]


def _rgb(value: Sequence | np.ndarray | str) -> Rgb:
    if isinstance(value, str):
        return hex_to_rgb(value)
    arr = np.asarray(value).reshape(-1)
    if arr.size != 3 or arr.min() < 0 or arr.max() > 255:
        raise ParameterError(f"colour {value!r} must be an (r, g, b) triple in 0..255")
    return (int(arr[0]), int(arr[1]), int(arr[2]))


def _clean_measurements(values: Mapping[str, object]) -> dict[str, float]:
    """Finite numbers only: JSON has no NaN, and QuPath treats a missing value as NaN."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise ParameterError(f"measurement {key!r}={value!r} must be a number")
        number = float(value)
        if np.isfinite(number):
            out[str(key)] = int(value) if isinstance(value, (int, np.integer)) else number
    return out


def _per_shape_measurements(
    measurements: Sequence[Mapping] | Mapping[str, Sequence] | None, n: int
) -> list[dict[str, float]]:
    if measurements is None:
        return [{} for _ in range(n)]
    if isinstance(measurements, Mapping):
        columns = {k: np.asarray(v).reshape(-1) for k, v in measurements.items()}
        for key, column in columns.items():
            if len(column) != n:
                raise ParameterError(
                    f"measurement {key!r} has {len(column)} values for {n} shapes; give one each"
                )
        return [_clean_measurements({k: c[i].item() for k, c in columns.items()}) for i in range(n)]
    rows = list(measurements)
    if len(rows) != n:
        raise ParameterError(f"{len(rows)} measurement rows for {n} shapes; give one each")
    return [_clean_measurements(row or {}) for row in rows]


def _class_colours(
    classes: list[str | None],
    colours: Sequence | Mapping | np.ndarray | None,
) -> list[Rgb | None]:
    """One colour per shape: explicit per shape, per class (mapping), or a palette by class."""
    n = len(classes)
    if isinstance(colours, Mapping):
        palette = {str(k): _rgb(v) for k, v in colours.items()}
        missing = sorted({c for c in classes if c is not None and c not in palette})
        if missing:
            raise ParameterError(f"no colour given for classes {missing}")
        return [palette[c] if c is not None else None for c in classes]
    if colours is not None:
        rows = list(colours)
        if len(rows) != n:
            raise ParameterError(f"{len(rows)} colours for {n} shapes; give one per shape")
        return [None if c is None else _rgb(c) for c in rows]
    names = list(dict.fromkeys(c for c in classes if c is not None))
    auto = categorical_colours(len(names))
    lookup = {name: _rgb(auto[i]) for i, name in enumerate(names)}
    return [lookup[c] if c is not None else None for c in classes]


def _feature(
    ring: list[list[float]],
    object_type: str,
    class_name: str | None,
    colour: Rgb | None,
    measurements: dict[str, float],
    name: str | None = None,
) -> dict:
    properties: dict = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if class_name is not None:
        classification: dict = {"name": class_name}
        if colour is not None:
            classification["color"] = list(colour)
        properties["classification"] = classification
    elif colour is not None:
        properties["color"] = list(colour)
    if measurements:
        properties["measurements"] = measurements
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": properties,
    }


def _check_object_type(object_type: str) -> None:
    if object_type not in OBJECT_TYPES:
        raise ParameterError(
            f"objectType {object_type!r} is not a QuPath object type; use one of {OBJECT_TYPES}"
        )


def shapes_to_geojson(
    shapes: Sequence[Roi | Sequence | np.ndarray],
    classes: Sequence[str | None] | None = None,
    colours: Sequence | Mapping | np.ndarray | None = None,
    measurements: Sequence[Mapping] | Mapping[str, Sequence] | None = None,
    object_type: str = "annotation",
    names: Sequence[str | None] | None = None,
) -> dict:
    """A FeatureCollection with one polygon Feature per shape.

    ``shapes`` are ``(M, 2)`` level-0 ``(x, y)`` polygons, ``(x, y, w, h)`` rectangles or
    :class:`Roi` objects. ``classes`` gives each shape's class name (None: unclassified).
    ``colours`` is one colour per shape, a ``{class: colour}`` mapping, or None for a fixed
    palette by class. ``measurements`` is one dict per shape or ``{name: values per shape}``.
    """
    _check_object_type(object_type)
    rings = [_ring(s) for s in shapes]
    n = len(rings)
    class_list = [None if c is None else str(c) for c in classes] if classes else [None] * n
    if len(class_list) != n:
        raise ParameterError(f"{len(class_list)} classes for {n} shapes; give one per shape")
    name_list = list(names) if names is not None else [None] * n
    if len(name_list) != n:
        raise ParameterError(f"{len(name_list)} names for {n} shapes; give one per shape")
    colour_list = _class_colours(class_list, colours)
    rows = _per_shape_measurements(measurements, n)
    features = [
        _feature(rings[i], object_type, class_list[i], colour_list[i], rows[i], name_list[i])
        for i in range(n)
    ]
    return {"type": "FeatureCollection", "features": features}


def tiles_to_geojson(
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, Sequence] | None = None,
    classes: Sequence | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    colours: Sequence | Mapping | np.ndarray | None = None,
    object_type: str = "tile",
) -> dict:
    """A FeatureCollection of square tiles carrying per-tile measurements (and classes).

    ``measurements`` maps a name to ``(N,)`` values (e.g. a probe's class probabilities or a
    similarity score). ``classes`` holds class names, or class indices into ``class_names``.
    ``colours`` follows :func:`shapes_to_geojson`; with ``class_names`` and a ``(C, 3)`` array
    it is read as one colour per class.
    """
    _check_object_type(object_type)
    xy = as_coords(coords)
    size = check_tile_size(tile_size_l0)
    n = len(xy)
    if classes is not None:
        values = list(np.asarray(classes).tolist())
        if len(values) != n:
            raise ParameterError(f"{len(values)} classes for {n} tiles; give one per tile")
        if class_names is not None:
            names = [str(c) for c in class_names]
            class_list = []
            for v in values:
                if isinstance(v, int) and 0 <= v < len(names):
                    class_list.append(names[v])
                elif isinstance(v, str) and v in names:
                    class_list.append(v)
                else:
                    raise ParameterError(
                        f"tile class {v!r} is neither an index in [0, {len(names)}) nor one of "
                        f"{names}"
                    )
            if colours is not None and not isinstance(colours, Mapping):
                colours = {name: colours[i] for i, name in enumerate(names)}
        else:
            class_list = [None if v is None else str(v) for v in values]
    else:
        class_list = [None] * n
    colour_list = _class_colours(class_list, colours)
    rows = _per_shape_measurements(measurements, n)
    features = []
    for i, (x, y) in enumerate(xy.tolist()):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append(_feature(ring, object_type, class_list[i], colour_list[i], rows[i]))
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, obj: dict | list) -> Path:
    """Write GeoJSON atomically (temporary file then rename); return the path."""
    try:
        text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:
        raise ParameterError(f"cannot write GeoJSON {path}: {exc}") from None
    return atomic_write_text(path, text, "GeoJSON")


# ----------------------------------------------------------------------------- reading


def _colour_from(value: object) -> Rgb | None:
    """QuPath colours: ``[r, g, b]`` or a packed (possibly negative, Java) ARGB int."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        try:
            return (int(value[0]), int(value[1]), int(value[2]))
        except (TypeError, ValueError):
            return None
    return None


def _measurements_from(value: object) -> dict[str, float]:
    """``{name: value}`` (QuPath >= 0.4) or the older ``[{name, value}]`` list."""
    pairs: list[tuple[object, object]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [(m.get("name"), m.get("value")) for m in value if isinstance(m, Mapping)]
    out: dict[str, float] = {}
    for key, number in pairs:
        if key is None or isinstance(number, bool):
            continue
        if isinstance(number, (int, float)):
            out[str(key)] = float(number)
        elif number is None or number == "NaN":
            out[str(key)] = float("nan")
    return out


def _outer_ring(coordinates: object, where: str) -> tuple[np.ndarray, int]:
    if not isinstance(coordinates, list) or not coordinates:
        raise ParameterError(f"{where}: a Polygon needs a list of rings")
    try:
        ring = np.asarray([pt[:2] for pt in coordinates[0]], dtype=np.float64)
    except (TypeError, ValueError, IndexError):
        raise ParameterError(f"{where}: polygon coordinates must be [x, y] numbers") from None
    if ring.ndim != 2 or ring.shape[1] != 2 or not np.all(np.isfinite(ring)):
        raise ParameterError(f"{where}: polygon coordinates must be finite [x, y] pairs")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(np.unique(ring, axis=0)) < 3:
        raise ParameterError(f"{where}: polygon has fewer than 3 distinct vertices")
    return ring, len(coordinates) - 1


def _features_of(data: object, src: Path) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        kind = data.get("type")
        if kind == "FeatureCollection":
            features = data.get("features")
            if not isinstance(features, list):
                raise ParameterError(f"{src}: FeatureCollection has no 'features' list")
            return features
        if kind == "Feature":
            return [data]
        if kind in ("Polygon", "MultiPolygon"):
            return [{"type": "Feature", "geometry": data, "properties": {}}]
        raise ParameterError(
            f"{src}: top-level GeoJSON type {kind!r} is not supported; "
            "give a FeatureCollection, a Feature or a list of Features"
        )
    raise ParameterError(f"{src}: GeoJSON must be an object or a list of Features")


def read_geojson(path: str | os.PathLike) -> list[Annotation]:
    """Read polygons with their class, colour and measurements from a (QuPath) GeoJSON file.

    Accepts a FeatureCollection, a bare list of Features (QuPath's default export) or a single
    Feature. Polygons give one :class:`Annotation`, MultiPolygons one per part; holes are
    dropped (see the module notes). Any other geometry raises ParameterError.
    """
    src = Path(path)
    if not src.is_file():
        raise ParameterError(f"GeoJSON file {src} not found")
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ParameterError(f"{src} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise ParameterError(f"{src} is not a UTF-8 text GeoJSON file") from None

    annotations: list[Annotation] = []
    for i, feature in enumerate(_features_of(data, src)):
        where = f"{src}: feature {i}"
        if not isinstance(feature, Mapping) or not isinstance(feature.get("geometry"), Mapping):
            raise ParameterError(f"{where} has no geometry")
        geometry = feature["geometry"]
        props = feature.get("properties") or {}
        if not isinstance(props, Mapping):
            props = {}
        kind = geometry.get("type")
        if kind == "Polygon":
            parts = [geometry.get("coordinates")]
        elif kind == "MultiPolygon":
            parts = geometry.get("coordinates")
            if not isinstance(parts, list):
                raise ParameterError(f"{where}: a MultiPolygon needs a list of polygons")
        else:
            raise ParameterError(
                f"{where} has geometry type {kind!r}; only Polygon and MultiPolygon areas can be "
                "read (convert points and lines to areas first)"
            )
        object_type = props.get("objectType", props.get("object_type", props.get("type")))
        classification = props.get("classification")
        class_name: str | None = None
        colour = _colour_from(props.get("color"))
        if isinstance(classification, Mapping):
            class_name = classification.get("name")
            class_colour = classification.get("color", classification.get("colorRGB"))
            colour = _colour_from(class_colour) or colour
        elif isinstance(classification, str):
            class_name = classification
        measurements = _measurements_from(props.get("measurements"))
        name = props.get("name")
        for part in parts:
            ring, holes = _outer_ring(part, where)
            annotations.append(
                Annotation(
                    polygon=ring,
                    class_name=None if class_name is None else str(class_name),
                    colour=colour,
                    measurements=dict(measurements),
                    object_type=str(object_type) if object_type else "annotation",
                    name=None if name is None else str(name),
                    holes_dropped=holes,
                )
            )
    return annotations
