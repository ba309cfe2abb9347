"""Going to a library hit in the viewer: open or switch to its slide, frame it, outline it.

Qt-free (napari layers and camera only). The hit's slide is shown through the viewer's
:class:`._slide_view.SlideSwitcher` (one slide at a time, every slide opening at the world
origin), which hides the other slides with their layers and remembers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_gpfm.errors import SlideError
from napari_gpfm.library.gallery import CameraView, box_corners, camera_for_box
from napari_gpfm.napari._overlays import LayerData, edge_width_for, place_layer
from napari_gpfm.napari._session import OVERLAY_KEY, SlideRef
from napari_gpfm.napari._slide_view import SlideSwitcher, find_slide_layer

if TYPE_CHECKING:
    from napari_gpfm.library.index import LibraryHit

MATCH_LAYER_SUFFIX = "library match"
MATCH_COLOUR = "#ffd400"  # yellow: stands out on H&E pink and purple, unlike cyan on blue


def open_slide_layer(viewer: Any, path: str | Path, mpp: float | None = None) -> Any:
    """Open ``path`` through napari-gpfm's reader (as File > Open does) and return its layer.

    ``mpp``: the level-0 um/px the slide was embedded at, used when the file records none
    (the file's own value wins otherwise, as when the user opens it).
    """
    from napari_gpfm.napari._reader import _open_cached

    file = Path(path)
    if not file.is_file():
        raise SlideError(
            f"slide {file} is missing (moved or deleted since it was embedded); restore it, or "
            "drop it from the library with `gpfm index remove`"
        )
    # A damaged file raises its one-line SlideError here, not in napari; the reader then
    # finds this Slide (with its pixel size) in the cache.
    slide = _open_cached(file)
    if not slide.has_mpp and mpp is not None:
        _open_cached(file, mpp=mpp)  # no pixel size in the file: the embedding's
    added = viewer.open(str(file), plugin="napari-gpfm")
    layer = next((lay for lay in added if SlideRef.from_layer(lay) is not None), None)
    if layer is None:  # pragma: no cover - our reader always returns the slide layer
        raise SlideError(f"napari-gpfm's reader returned no slide layer for {file}")
    return layer


def match_layer_data(ref: SlideRef, hit: LibraryHit, provenance: Mapping[str, Any]) -> LayerData:
    """A Shapes layer outlining ``hit``'s level-0 box on ``ref``'s slide (one per slide).

    ``kind`` is ``similar-tiles`` like the in-slide results, so the panels never offer it as
    a query or training layer; its metadata records the slide, so it saves as GeoJSON.
    """
    corners = ref.level0_to_data(box_corners(hit.box))
    overlay = {
        "kind": "similar-tiles",
        "source": "library",
        "slide": ref.to_metadata(),
        "slide_path": str(ref.path),
        "slide_fingerprint": ref.fingerprint,
        "slide_name": ref.name,
        "rank": int(hit.rank),
        "score": float(hit.score),
        "box_level0": [float(v) for v in hit.box],
        "store": str(hit.store_path),
        **dict(provenance),
    }
    kwargs = {
        "name": f"{ref.name} · {MATCH_LAYER_SUFFIX}",
        "shape_type": "rectangle",
        "edge_color": MATCH_COLOUR,
        "face_color": "transparent",
        "edge_width": edge_width_for(ref, float(hit.w)),
        "features": {"rank": [int(hit.rank)], "score": [float(hit.score)]},
        "text": {"string": "{rank}", "size": 10, "color": MATCH_COLOUR, "anchor": "upper_left"},
        "metadata": {OVERLAY_KEY: overlay},
        **ref.layer_kwargs(),
    }
    return [corners], kwargs, "shapes"


def go_to_hit(viewer: Any, hit: LibraryHit, switcher: SlideSwitcher,
              provenance: Mapping[str, Any] | None = None) -> tuple[Any, CameraView]:
    """Show ``hit``'s slide (opening it if it is not open), outline the hit and frame it.

    Returns the slide layer and the camera view set.
    """
    layer = find_slide_layer(viewer, hit.slide_fingerprint)
    if layer is None:
        layer = open_slide_layer(viewer, hit.slide_path, mpp=hit.slide_mpp)
        ref = SlideRef.from_layer(layer)
        if ref.fingerprint != hit.slide_fingerprint:
            viewer.layers.remove(layer)
            raise SlideError(
                f"slide {hit.slide_path} changed since it was embedded (its content fingerprint "
                "differs), so the hit's position may be wrong; embed it again and refresh the "
                "library with `gpfm index add`"
            )
    ref = SlideRef.from_layer(layer)
    switcher.show(viewer, layer)
    # After switching: a replaced outline inherits its predecessor's visibility.
    outline = place_layer(viewer, match_layer_data(ref, hit, provenance or {}))
    outline.visible = True
    viewer.layers.selection.active = layer
    view = camera_for_box(hit.box, ref.scale_yx, ref.translate_yx, viewer.canvas.size)
    camera = viewer.scene.camera
    camera.center = view.center_yx
    camera.zoom = view.zoom
    return layer, view
