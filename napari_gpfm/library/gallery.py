"""Library hits as a gallery: thumbnails read from the slides, and where to look (Qt-free).

:func:`gallery_search` is the whole job behind the Similar regions panel's library search: open
the library, run the region query (:func:`napari_gpfm.library.query.search_roi`), then read a
thumbnail of every hit from its slide. It is a generator so the panel can run it in a worker
thread, show progress after each step and stop between thumbnails.

The geometry the viewer needs is here too, so it is tested without a viewer: the rectangle of
a hit (:func:`box_corners`) and the camera centre and zoom that frame it
(:func:`camera_for_box`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_gpfm.errors import GPFMError, ParameterError

if TYPE_CHECKING:
    from napari_gpfm.library.index import LibraryHit
    from napari_gpfm.library.query import SearchOptions
    from napari_gpfm.slides import Slide

# Thumbnail side in screen pixels: large enough to judge tissue, small enough for a grid of
# dozens in a dock panel.
THUMBNAIL_PX = 128
# How many hit widths the view spans after jumping to a hit: the region plus its surroundings,
# which is what a pathologist needs to judge a match.
BOXES_ACROSS = 6


# ----------------------------------------------------------------------------- geometry
def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ParameterError(f"box {box!r} must be level-0 (x, y, w, h)") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ParameterError(f"box {box!r} must be finite with positive width and height")
    return x, y, w, h


def box_corners(box: Sequence[float]) -> np.ndarray:
    """The 4 level-0 ``(x, y)`` corners of ``box = (x, y, w, h)``, clockwise from top-left."""
    x, y, w, h = _check_box(box)
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


@dataclass(frozen=True)
class CameraView:
    """Where the viewer's camera should look: world centre ``(y, x)`` and zoom (screen px per
    world unit, napari's ``camera.zoom``)."""

    center_yx: tuple[float, float]
    zoom: float


def camera_for_box(box: Sequence[float], scale_yx: Sequence[float],
                   translate_yx: Sequence[float], canvas_size: Sequence[int],
                   boxes_across: float = BOXES_ACROSS) -> CameraView:
    """Centre on ``box`` (level-0) and zoom so the canvas's shorter side spans
    ``boxes_across`` box widths.

    ``scale_yx`` / ``translate_yx`` are the slide layer's (world units per level-0 pixel, and
    offset). napari centres data pixel ``i`` on ``translate + i * scale`` while level-0 pixel
    ``i`` covers ``[i, i + 1)``, so level-0 ``x`` is world ``(x - 0.5) * scale + translate``
    (the convention of ``SlideRef.level0_to_world``).
    """
    x, y, w, h = _check_box(box)
    sy, sx = (float(v) for v in scale_yx)
    ty, tx = (float(v) for v in translate_yx)
    canvas = [int(v) for v in canvas_size]
    if len(canvas) != 2 or min(canvas) <= 0:
        raise ParameterError(f"canvas size {tuple(canvas_size)} must be two positive pixel counts")
    if boxes_across <= 0:
        raise ParameterError(f"boxes_across={boxes_across} must be positive")
    cx, cy = x + w / 2.0, y + h / 2.0
    center = ((cy - 0.5) * sy + ty, (cx - 0.5) * sx + tx)
    span_world = boxes_across * max(w * abs(sx), h * abs(sy))
    return CameraView(center_yx=center, zoom=min(canvas) / span_world)


# ----------------------------------------------------------------------------- thumbnails
def read_thumbnail(slide: Slide, box: Sequence[float], size: int = THUMBNAIL_PX) -> np.ndarray:
    """The slide's pixels inside level-0 ``box``, ``size`` px on the longer side (RGB uint8).

    Reads the coarsest pyramid level still at least as sharp as the thumbnail, so a thumbnail
    of a large region costs about ``size**2`` pixels, not the region's level-0 area.
    """
    from napari_gpfm.slides import resize_rgb

    x, y, w, h = _check_box(box)
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ParameterError(f"thumbnail size={size!r} must be a whole number >= 1")
    size = int(size)
    longer = max(w, h)
    level = slide.best_level_for_downsample(max(longer / size, 1.0))
    ds = slide.level_downsamples[level]
    read_w, read_h = max(1, round(w / ds)), max(1, round(h / ds))
    region = slide.read_region((math.floor(x), math.floor(y)), level, (read_w, read_h))
    out_w = max(1, round(size * w / longer))
    out_h = max(1, round(size * h / longer))
    return resize_rgb(region, (out_w, out_h))


@dataclass(frozen=True)
class Thumbnail:
    """The picture of hit number ``index`` (its position in the hit list), or why there is none."""

    index: int
    image: np.ndarray | None
    error: str | None = None


def iter_thumbnails(hits: Sequence[LibraryHit], size: int = THUMBNAIL_PX) -> Iterator[Thumbnail]:
    """One :class:`Thumbnail` per hit, in hit order, each slide opened once.

    A slide that cannot be read (moved, damaged) gives thumbnails with an ``error`` instead of
    stopping the others. Slides are closed when the generator ends or is closed.
    """
    from napari_gpfm.slides import open_slide

    opened: dict[str, Slide | GPFMError] = {}
    try:
        for index, hit in enumerate(hits):
            key = hit.slide_path
            if key not in opened:
                try:
                    opened[key] = open_slide(key, mpp=hit.slide_mpp)
                except GPFMError as exc:
                    opened[key] = exc
            slide = opened[key]
            if isinstance(slide, GPFMError):
                yield Thumbnail(index, None, f"{hit.slide_name}: {slide}")
                continue
            try:
                yield Thumbnail(index, read_thumbnail(slide, hit.box, size))
            except GPFMError as exc:
                yield Thumbnail(index, None, f"{hit.slide_name}: {exc}")
    finally:
        for slide in opened.values():
            if not isinstance(slide, GPFMError):
                slide.close()


# ----------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class GalleryStage:
    """A step of the job is starting (for the status line)."""

    message: str


@dataclass(frozen=True)
class GalleryHits:
    """The search is done: the hits, best first (slide by slide when grouped)."""

    hits: list[LibraryHit]
    library_path: Path
    n_slides: int
    n_tiles: int
    options: SearchOptions
    info: dict[str, Any] = field(default_factory=dict)


GalleryEvent = GalleryStage | GalleryHits | Thumbnail


def gallery_search(library_path: str | os.PathLike, store: str | os.PathLike, roi: Any,
                   options: SearchOptions, thumbnail_px: int = THUMBNAIL_PX,
                   verify: bool = True) -> Iterator[GalleryEvent]:
    """Search library ``library_path`` with the tiles of ``store`` inside ``roi`` and read
    the hits' thumbnails: yields a :class:`GalleryStage` before each step, one
    :class:`GalleryHits`, then one :class:`Thumbnail` per hit.

    ``verify`` checks first that the library's stores and slides are unchanged (like
    ``gpfm index search`` without ``--no-check``).
    """
    from napari_gpfm.library.index import LibraryIndex
    from napari_gpfm.library.query import search_roi

    path = Path(library_path).expanduser()
    yield GalleryStage(f"Opening library {path.name}…")
    library = LibraryIndex.open(path, verify=verify)
    yield GalleryStage(
        f"Searching {len(library)} tiles of {len(library.slides)} slides in {path.name}…"
    )
    hits = search_roi(library, store, roi, options)
    yield GalleryHits(hits=list(hits), library_path=library.path,
                      n_slides=len(library.slides), n_tiles=len(library),
                      options=options, info={"encoder_id": library.identity["encoder_id"],
                                             "tiling_id": library.identity["tiling_id"]})
    if hits:
        yield GalleryStage(f"Reading {len(hits)} thumbnails…")
    yield from iter_thumbnails(hits, thumbnail_px)
