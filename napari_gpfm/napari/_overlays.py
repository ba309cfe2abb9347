"""Layer data for results drawn over a slide: maps, labels, tile boxes (Qt-free).

Every builder returns a napari layer-data tuple ``(data, kwargs, layer_type)`` whose
scale/translate put it exactly over the slide layer (through
:meth:`TileRaster.napari_transform`) and whose metadata records the slide (path + fingerprint),
encoder id, tiling id and store that made it (``metadata["gpfm_overlay"]``). Layers that
stand for tiles also carry the tiles themselves (``metadata["gpfm_tiles"]``: level-0 coords,
tile size, per-tile measurements and classes) so they can be saved as QuPath GeoJSON tiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from napari_gpfm.napari._session import OVERLAY_KEY, TILES_KEY, SlideRef, TileSet

LayerData = tuple[Any, dict, str]
OVERLAY_OPACITY = 0.5


def tiles_info(
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray] | None = None,
    classes: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
) -> dict:
    """The tiles a layer stands for, as ``metadata["gpfm_tiles"]`` (what the tile writer reads)."""
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    info: dict[str, Any] = {
        "coords": xy,
        "tile_size_l0": float(tile_size_l0),
        "measurements": {
            str(k): np.asarray(v, dtype=np.float64).reshape(-1)
            for k, v in (measurements or {}).items()
        },
    }
    for key, values in info["measurements"].items():
        if len(values) != len(xy):
            raise ValueError(f"measurement {key!r} has {len(values)} values for {len(xy)} tiles")
    if classes is not None:
        info["classes"] = np.asarray(classes, dtype=np.int64).reshape(-1)
        info["class_names"] = [str(n) for n in (class_names or [])]
        info["colours"] = list(colours or [])
    return info


def overlay_metadata(
    tiles: TileSet, kind: str, tile_info: dict | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """``layer.metadata`` of a result: provenance (slide, encoder, tiling, store) + its tiles."""
    meta: dict[str, Any] = {
        OVERLAY_KEY: {"kind": kind, **tiles.provenance(), "slide": tiles.ref.to_metadata(),
                      **dict(extra or {})},
    }
    if tile_info is not None:
        meta[TILES_KEY] = tile_info
    return meta


def _raster_kwargs(raster: Any, ref: SlideRef) -> dict:
    """scale/translate (and units) that put a TileRaster over the slide layer."""
    sy, sx = ref.scale_yx
    transform = raster.napari_transform((sx, sy))
    ty, tx = ref.translate_yx
    kwargs: dict[str, Any] = {
        "scale": tuple(transform["scale"]),
        "translate": (transform["translate"][0] + ty, transform["translate"][1] + tx),
    }
    if ref.has_mpp:
        kwargs["units"] = ("um", "um")
    return kwargs


def score_layer(
    tiles: TileSet,
    values: np.ndarray,
    name: str,
    kind: str,
    measurement: str,
    colormap: str = "inferno",
    extra: Mapping[str, Any] | None = None,
    limits: tuple[float, float] | None = None,
) -> LayerData:
    """A per-tile score as a float image (empty cells NaN: napari draws them transparent).

    ``limits`` fixes the colour range (e.g. 0-1 for probabilities); default: the data range.
    """
    from napari_gpfm.analysis.rasters import tile_raster

    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    raster = tile_raster(tiles.coords, tiles.tile_size_l0, vals, tiles.slide_dims, tiles.stride_l0)
    finite = vals[np.isfinite(vals)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    if limits is not None:
        lo, hi = float(limits[0]), float(limits[1])
    if hi <= lo:
        hi = lo + 1e-6
    kwargs = {
        "name": name,
        "colormap": colormap,
        "contrast_limits": (lo, hi),
        "opacity": OVERLAY_OPACITY,
        "blending": "translucent",
        "interpolation2d": "nearest",
        "metadata": overlay_metadata(
            tiles, kind, tiles_info(tiles.coords, tiles.tile_size_l0, {measurement: vals}), extra
        ),
        **_raster_kwargs(raster, tiles.ref),
    }
    return raster.data.astype(np.float32), kwargs, "image"


def rgb_layer(
    tiles: TileSet, rgb01: np.ndarray, name: str, kind: str,
    extra: Mapping[str, Any] | None = None,
) -> LayerData:
    """Per-tile RGB colours in [0, 1] as an RGBA image (no tile: transparent)."""
    from napari_gpfm.analysis.rasters import raster_to_rgba, tile_raster

    rgb = np.asarray(rgb01, dtype=np.float64).reshape(len(tiles), 3)
    raster = tile_raster(tiles.coords, tiles.tile_size_l0, rgb, tiles.slide_dims, tiles.stride_l0)
    measurements = {f"{kind} {c}": rgb[:, i] for i, c in enumerate("RGB")}
    kwargs = {
        "name": name,
        "rgb": True,
        "opacity": OVERLAY_OPACITY * 1.4,
        "blending": "translucent",
        "interpolation2d": "nearest",
        "metadata": overlay_metadata(
            tiles, kind, tiles_info(tiles.coords, tiles.tile_size_l0, measurements), extra
        ),
        **_raster_kwargs(raster, tiles.ref),
    }
    return raster_to_rgba(raster), kwargs, "image"


def label_colormap(colours: Sequence[str]) -> Any:
    """Labels colours: label ``i + 1`` gets ``colours[i]``; 0 (no tile) is transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    from napari_gpfm.analysis.colours import hex_to_rgb

    mapping: dict[int | None, list[float]] = {None: [0.0, 0.0, 0.0, 0.0], 0: [0.0, 0.0, 0.0, 0.0]}
    for i, colour in enumerate(colours):
        r, g, b = hex_to_rgb(colour)
        mapping[i + 1] = [r / 255.0, g / 255.0, b / 255.0, 1.0]
    return DirectLabelColormap(color_dict=mapping)


def label_layer(
    tiles: TileSet,
    labels: np.ndarray,
    names: Sequence[str],
    colours: Sequence[str],
    name: str,
    kind: str,
    measurements: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> LayerData:
    """Per-tile classes or clusters as a Labels layer: label ``i + 1`` is ``names[i]``."""
    from napari_gpfm.analysis.rasters import tile_label_raster

    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    raster = tile_label_raster(
        tiles.coords, tiles.tile_size_l0, lab, len(names), tiles.slide_dims, tiles.stride_l0
    )
    info = tiles_info(tiles.coords, tiles.tile_size_l0, measurements, lab, names, colours)
    meta = overlay_metadata(tiles, kind, info, extra)
    kwargs = {
        "name": name,
        "opacity": OVERLAY_OPACITY,
        "blending": "translucent",
        "colormap": label_colormap(colours),
        "metadata": meta,
        "features": {"index": np.arange(len(names) + 1), "name": ["(no tile)", *names]},
        **_raster_kwargs(raster, tiles.ref),
    }
    return (raster.data + 1).astype(np.int32), kwargs, "labels"


def edge_width_for(ref: SlideRef, tile_size_l0: float | None = None) -> float:
    """An edge width in level-0 pixels that stays visible at the zooms people look at."""
    if tile_size_l0:
        return max(1.0, 0.06 * float(tile_size_l0))
    return max(2.0, max(ref.dims) / 250.0)


def tile_boxes_layer(
    tiles: TileSet,
    indices: np.ndarray,
    scores: np.ndarray,
    name: str,
    kind: str,
    colormap: str = "cyan",
    extra: Mapping[str, Any] | None = None,
) -> LayerData:
    """Tiles as rectangles (Shapes) with a ``features`` table; edge colour by score.

    The colour range starts below the lowest score so the last box is dim, not black; its
    cyan stands out on the inferno heatmap. Each box shows its rank.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    size = tiles.tile_size_l0
    xy = np.asarray(tiles.coords, dtype=np.float64)[idx]
    rects = []
    for x, y in xy:
        corners = np.array([[x, y], [x + size, y], [x + size, y + size], [x, y + size]])
        rects.append(tiles.ref.level0_to_data(corners))
    lo = float(sc.min()) if sc.size else 0.0
    hi = float(sc.max()) if sc.size else 1.0
    ranks = np.arange(1, len(idx) + 1)
    info = tiles_info(xy, size, {"score": sc, "rank": ranks})
    meta = overlay_metadata(tiles, kind, info, extra)
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "features": {
            "rank": ranks,
            "score": sc,
            "tile": idx,
            "x": xy[:, 0] if len(xy) else np.zeros(0),
            "y": xy[:, 1] if len(xy) else np.zeros(0),
        },
        "edge_color": "score",
        "edge_colormap": colormap,
        "edge_contrast_limits": (lo - 0.5 * max(hi - lo, 1e-6), max(hi, lo + 1e-6)),
        "text": {"string": "{rank}", "size": 9, "color": "white", "anchor": "upper_left"},
        "face_color": "transparent",
        "edge_width": edge_width_for(tiles.ref, size),
        "metadata": meta,
        **tiles.ref.layer_kwargs(),
    }
    return rects, kwargs, "shapes"


# Layer state a rerun keeps: the name, whether the user hid the layer, read-only attributes.
# Everything else (colour map, opacity, ...) is the new result's, as when the layer was new.
_KEPT_STATE = frozenset({"name", "visible", "multiscale", "rgb", "ndim", "properties",
                         "property_choices"})


def place_layer(viewer: Any, layer_data: LayerData) -> Any:
    """Add a result layer, or give the layer of the same name the new result (a rerun).

    A rerun updates that layer in place (same position in the list, same visibility) rather
    than removing it and inserting a new one: removing a hidden layer crashes napari's OpenGL
    on Mesa's software renderer (llvmpipe, every machine without a GPU driver), and users hide
    result layers. Only a layer of another type (or RGB-ness) of that name is replaced.
    New maps go below the drawing layers (Shapes, Points) so the user's regions stay visible
    on top; new Shapes results go on top.
    """
    from napari.layers import Layer, Points, Shapes

    data, kwargs, layer_type = layer_data
    layer = Layer.create(data, dict(kwargs), layer_type)
    name = kwargs.get("name")
    layers = list(viewer.layers)
    old = next((lay for lay in layers if lay.name == name), None)
    if old is not None:
        if _update_in_place(old, layer):
            return old
        index = layers.index(old)
        layer.visible = old.visible
        viewer.layers.remove(old)
        viewer.layers.insert(index, layer)
        return layer
    if layer_type in ("image", "labels"):
        drawing = [i for i, lay in enumerate(layers) if isinstance(lay, Shapes | Points)]
        if drawing:
            viewer.layers.insert(drawing[0], layer)
            return layer
    viewer.add_layer(layer)
    return layer


def _update_in_place(old: Any, new: Any) -> bool:
    """Give ``old`` the data and every setting of ``new``; False when their kinds differ."""
    if type(old) is not type(new) or getattr(old, "rgb", None) != getattr(new, "rgb", None):
        return False
    if old.ndim != new.ndim:
        return False
    data, state, _ = new.as_layer_data_tuple()
    old.data = data
    for key, value in state.items():
        # An empty Shapes result has no shape types; napari cannot set an empty list of them.
        if key not in _KEPT_STATE and not (key == "shape_type" and len(data) == 0):
            setattr(old, key, value)
    return True
