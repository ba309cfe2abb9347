"""npe2 writers and reader for QuPath GeoJSON (level-0 pixels, origin top-left).

Writers:

* Shapes -> GeoJSON annotations. Rectangles, polygons and ellipses (as 64-point polygons)
  are written; lines and paths are skipped (QuPath areas only). The class of each shape is
  ``layer.features["class"]`` when present, its colour the shape's edge colour, and numeric
  feature columns become QuPath measurements.
* Maps and label layers made by napari-gpfm (they carry their tiles in
  ``metadata["gpfm_tiles"]``) -> GeoJSON tiles with measurements (and classes), which QuPath
  draws with *Measure > Show measurement maps*.

World micrometres are turned into level-0 pixels with the slide the layer was drawn over:
the one recorded in the layer's metadata, else the only slide open (or shown) in the viewer.

Both writers record ``{"gpfm": {"slide": {...}}}`` in the FeatureCollection's ``properties``
(QuPath ignores it). The reader uses it to place the shapes on that slide. A file without it
(e.g. exported by QuPath) is placed on the only slide open in the viewer (or, with several
open, the only one shown), otherwise it stays in level-0 pixels (scale 1) with a warning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import ParameterError
from napari_gpfm.napari._overlays import edge_width_for
from napari_gpfm.napari._session import (
    OVERLAY_KEY,
    TILES_KEY,
    SlideRef,
    shape_world_outline,
    slide_layers,
    world_transform,
)

GEOJSON_FORMAT = "napari-gpfm/geojson"
GEOJSON_SUFFIX = ".geojson"
_TEXT_COLUMNS = ("class", "name", "object_type")
DEFAULT_COLOUR = (255, 200, 0)


# ----------------------------------------------------------------------------- helpers
def _current_viewer() -> Any:
    try:
        from napari import current_viewer

        return current_viewer()
    except ImportError:  # pragma: no cover - napari is installed with the plugin
        return None


def _only_open_slide() -> SlideRef | None:
    """The slide open in the viewer; with several open, the one shown (the others hidden, as
    going to a library hit leaves them); None when that does not single one out."""
    viewer = _current_viewer()
    if viewer is None:
        return None
    layers = slide_layers(viewer)
    if len(layers) > 1:
        layers = [layer for layer in layers if layer.visible]
    return SlideRef.from_layer(layers[0]) if len(layers) == 1 else None


def _open_slide_with(fingerprint: str) -> SlideRef | None:
    viewer = _current_viewer()
    if viewer is None:
        return None
    for layer in slide_layers(viewer):
        ref = SlideRef.from_layer(layer)
        if ref is not None and ref.fingerprint == fingerprint:
            return ref
    return None


def slide_for_layer(meta: Mapping, layer_name: str) -> SlideRef:
    """The slide a layer was drawn over, from its metadata or the only open slide."""
    metadata = meta.get("metadata") or {}
    overlay = metadata.get(OVERLAY_KEY) if isinstance(metadata, Mapping) else None
    info = overlay.get("slide") if isinstance(overlay, Mapping) else None
    if isinstance(info, Mapping) and info.get("fingerprint"):
        recorded = SlideRef.from_metadata(info)
        return _open_slide_with(recorded.fingerprint) or recorded
    ref = _only_open_slide()
    if ref is None:
        raise ParameterError(
            f"cannot tell which slide layer {layer_name!r} belongs to, so its micrometres cannot "
            "be turned into slide pixels; show only its slide (hide the others), or draw the "
            "regions in a layer made by a napari-gpfm widget"
        )
    return ref


def _collection_properties(ref: SlideRef) -> dict:
    return {
        "gpfm": {
            "format": GEOJSON_FORMAT,
            "version": 1,
            "units": "level-0 pixels, origin top-left",
            "slide": ref.to_metadata(),
        }
    }


def _rgb255(colour: np.ndarray) -> tuple[int, int, int]:
    rgba = np.clip(np.asarray(colour, dtype=np.float64).reshape(-1), 0.0, 1.0)
    return tuple(int(round(v * 255)) for v in rgba[:3])  # type: ignore[return-value]


def _column(features: Any, name: str) -> list | None:
    if features is None or name not in getattr(features, "columns", ()):
        return None
    return list(features[name])


def _text_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


# ----------------------------------------------------------------------------- writers
def write_shapes_geojson(path: str, data: list, meta: dict) -> list[str]:
    """npe2 single-layer writer: a Shapes layer -> QuPath GeoJSON annotations."""
    from napari_gpfm.analysis.geojson import shapes_to_geojson, write_geojson

    name = str(meta.get("name", "shapes"))
    ref = slide_for_layer(meta, name)
    to_world = world_transform(meta)
    kinds = list(meta.get("shape_type") or ["polygon"] * len(data))
    features = meta.get("features")
    classes = _column(features, "class")
    names = _column(features, "name")
    edge = np.asarray(meta.get("edge_color", np.zeros((0, 4))))
    numeric = []
    if features is not None and len(getattr(features, "columns", ())):
        numeric = [
            c for c in features.columns
            if c not in _TEXT_COLUMNS and np.issubdtype(np.asarray(features[c]).dtype, np.number)
        ]

    polygons, shape_classes, shape_names, colours, measurements = [], [], [], [], []
    skipped = 0
    for i, shape in enumerate(data):
        world = shape_world_outline(kinds[i], shape, to_world)
        ring = None if world is None else ref.world_to_level0(world)
        if ring is None or len(np.unique(np.round(ring, 6), axis=0)) < 3:
            skipped += 1
            continue
        polygons.append(ring)
        shape_classes.append(_text_or_none(classes[i]) if classes else None)
        shape_names.append(_text_or_none(names[i]) if names else None)
        colours.append(_rgb255(edge[i]) if i < len(edge) else DEFAULT_COLOUR)
        measurements.append({c: float(features[c].iloc[i]) for c in numeric})
    if not polygons:
        raise ParameterError(
            f"layer {name!r} has no rectangles, polygons or ellipses to save as GeoJSON "
            "(lines and paths are not areas)"
        )
    collection = shapes_to_geojson(
        polygons, classes=shape_classes, colours=colours, measurements=measurements,
        names=shape_names,
    )
    collection["properties"] = _collection_properties(ref)
    if skipped:
        from napari.utils.notifications import show_warning

        show_warning(
            f"{skipped} line/path shape(s) of {name!r} were not saved: GeoJSON holds areas"
        )
    return [str(write_geojson(path, collection))]


def write_tiles_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: a napari-gpfm map or label layer -> QuPath GeoJSON tiles."""
    from napari_gpfm.analysis.geojson import tiles_to_geojson, write_geojson

    name = str(meta.get("name", "layer"))
    metadata = meta.get("metadata") or {}
    info = metadata.get(TILES_KEY) if isinstance(metadata, Mapping) else None
    if not isinstance(info, Mapping) or "coords" not in info:
        raise ParameterError(
            f"layer {name!r} is not a napari-gpfm tile map, so it has no tiles to save as "
            "GeoJSON; save a map, cluster or class layer made by the napari-gpfm widgets"
        )
    ref = slide_for_layer(meta, name)
    classes = info.get("classes")
    class_kwargs: dict[str, Any] = {}
    if classes is not None:
        class_kwargs = {
            "classes": [int(c) for c in classes],
            "class_names": list(info.get("class_names") or []),
            "colours": list(info.get("colours") or []) or None,
        }
    collection = tiles_to_geojson(
        np.asarray(info["coords"]),
        float(info["tile_size_l0"]),
        measurements=dict(info.get("measurements") or {}),
        **class_kwargs,
    )
    props = _collection_properties(ref)
    overlay = metadata.get(OVERLAY_KEY) if isinstance(metadata, Mapping) else None
    if isinstance(overlay, Mapping):
        props["gpfm"]["made_by"] = {
            k: overlay.get(k) for k in ("kind", "encoder_id", "tiling_id", "store") if k in overlay
        }
    collection["properties"] = props
    return [str(write_geojson(path, collection))]


# ----------------------------------------------------------------------------- reader
def get_geojson_reader(path: Any):
    """npe2 reader: claim ``*.geojson`` files; never raises."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        p = Path(path)
        if not p.name.lower().endswith(GEOJSON_SUFFIX) or not p.is_file():
            return None
    except (TypeError, ValueError, OSError):
        return None
    return read_geojson_layer


def _recorded_slide(path: Path) -> SlideRef | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    props = doc.get("properties") if isinstance(doc, Mapping) else None
    gpfm = props.get("gpfm") if isinstance(props, Mapping) else None
    info = gpfm.get("slide") if isinstance(gpfm, Mapping) else None
    if not isinstance(info, Mapping) or not info.get("fingerprint") or not info.get("path"):
        return None
    try:
        return SlideRef.from_metadata(info)
    except (KeyError, TypeError, ValueError):
        return None


def _placement(path: Path) -> tuple[SlideRef | None, str]:
    """The slide to place the file's shapes on, and how it was chosen (for the user)."""
    recorded = _recorded_slide(path)
    if recorded is not None:
        return _open_slide_with(recorded.fingerprint) or recorded, "recorded"
    only = _only_open_slide()
    if only is not None and only.has_mpp:
        return only, "open"
    return None, "pixels"


def _is_axis_aligned_rectangle(ring: np.ndarray) -> bool:
    if len(ring) != 4:
        return False
    xs, ys = np.unique(ring[:, 0]), np.unique(ring[:, 1])
    return len(xs) == 2 and len(ys) == 2


def read_geojson_layer(path: Any) -> list[tuple]:
    """Read a (QuPath) GeoJSON file as one Shapes layer with classes and measurements."""
    from napari.utils.notifications import show_info, show_warning

    from napari_gpfm.analysis.colours import categorical_colours
    from napari_gpfm.analysis.geojson import read_geojson

    if isinstance(path, list | tuple):
        path = path[0]
    src = Path(path)
    annotations = read_geojson(src)
    ref, how = _placement(src)

    class_names = list(dict.fromkeys(a.class_name for a in annotations if a.class_name))
    palette = {n: tuple(int(v) for v in c) for n, c in
               zip(class_names, categorical_colours(len(class_names)), strict=True)}
    measurement_names = list(dict.fromkeys(k for a in annotations for k in a.measurements))

    data, kinds, edges = [], [], []
    for a in annotations:
        ring = np.asarray(a.polygon, dtype=np.float64)
        yx = ref.level0_to_data(ring) if ref is not None else np.column_stack(
            [ring[:, 1] - 0.5, ring[:, 0] - 0.5]
        )
        data.append(yx)
        kinds.append("rectangle" if _is_axis_aligned_rectangle(ring) else "polygon")
        rgb = a.colour or palette.get(a.class_name or "", DEFAULT_COLOUR)
        edges.append([rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, 1.0])
    edge = np.asarray(edges, dtype=np.float64).reshape(-1, 4)
    face = edge.copy()
    tiles_like = bool(annotations) and all(
        a.object_type in ("tile", "detection") for a in annotations
    )
    face[:, 3] = 0.0 if tiles_like else 0.15

    features: dict[str, Any] = {
        "class": [a.class_name or "" for a in annotations],
        "name": [a.name or "" for a in annotations],
        "object_type": [a.object_type for a in annotations],
    }
    for m in measurement_names:
        features[m] = [a.measurements.get(m, np.nan) for a in annotations]

    # Tiles (an exported map: predictions) are never offered as training or query regions.
    overlay: dict[str, Any] = {"kind": "geojson-tiles" if tiles_like else "geojson",
                               "source": str(src)}
    kwargs: dict[str, Any] = {
        "name": src.stem,
        "shape_type": kinds,
        "edge_color": edge,
        "face_color": face,
        "features": features,
        "metadata": {OVERLAY_KEY: overlay},
    }
    if ref is not None:
        overlay["slide"] = ref.to_metadata()
        kwargs.update(ref.layer_kwargs())
        kwargs["edge_width"] = edge_width_for(ref) if max(ref.dims) else 4.0
        if how == "open":
            show_info(
                f"{src.name} has no slide information; its shapes were placed on the open slide "
                f"{ref.name} ({ref.mpp:.3g} um/px)"
            )
    else:
        kwargs["edge_width"] = 4.0
        show_warning(
            f"{src.name} does not say which slide it belongs to, and no single slide with a "
            "pixel size is open or shown: its shapes are shown in level-0 pixels (scale 1). "
            "Open (or show only) its slide first, then the GeoJSON, to place them on it"
        )
    return [(data, kwargs, "shapes")]
