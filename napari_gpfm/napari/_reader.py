"""npe2 reader: a whole-slide image as one multiscale RGB layer in micrometres."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_gpfm.errors import GPFMError
from napari_gpfm.slides import SLIDE_SUFFIXES

# Slides backing open layers: the dask pyramid reads through the slide's file handle, so the
# Slide must outlive the reader call. Keyed by resolved path; reopening the same file reuses it.
_OPEN_SLIDES: dict[str, Any] = {}


def _open_cached(path: str | Path, mpp: float | None = None):
    from napari_gpfm.slides import open_slide

    key = str(Path(path).resolve())
    slide = _OPEN_SLIDES.get(key)
    if slide is None or (mpp is not None and (slide.mpp_source != "user" or slide.mpp != mpp)):
        slide = open_slide(path, mpp=mpp)
        _OPEN_SLIDES[key] = slide
    return slide


# Extensions only whole-slide scanners write: a file named so that fails to open is a broken
# slide, not someone else's image, so the reader reports why instead of declining (napari's
# own message would only say that no reader could open it). A plain .tif may well be another
# plugin's, so those are declined quietly.
_SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")


def get_reader(path):
    """Return a reader for slide files tiffslide can open, else None. Never raises.

    QuPath GeoJSON files (``*.geojson``) go to the GeoJSON reader (Shapes with classes). A
    scanner's file (``.svs``, ``.ndpi``, ...) that cannot be opened gets a reader that raises
    the reason when napari calls it.
    """
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    if str(path).lower().endswith(".geojson"):
        from napari_gpfm.napari._geojson_io import get_geojson_reader

        return get_geojson_reader(path)
    try:
        p = Path(path)
        if not p.name.lower().endswith(SLIDE_SUFFIXES) or not p.is_file():
            return None
        _open_cached(p)
    except GPFMError as exc:
        if p.name.lower().endswith(_SLIDE_ONLY_SUFFIXES):
            return _refusal(exc)
        return None
    except Exception:  # napari asks every reader; declining is how we say "not ours"
        return None
    return read_slide


def _refusal(exc: Exception):
    def read_broken_slide(path) -> list[tuple]:
        raise exc

    return read_broken_slide


def slide_layer_data(slide) -> tuple[list, dict, str]:
    """The layer-data tuple for a slide: its pyramid with physical scale and metadata."""
    meta = {
        "gpfm_slide": {
            "path": str(slide.path),
            "fingerprint": slide.fingerprint,
            "mpp": slide.mpp if slide.has_mpp else None,
            "dimensions": list(slide.dimensions),
            "vendor": slide.vendor,
            "objective_power": slide.objective_power,
        }
    }
    kwargs: dict[str, Any] = {
        "name": slide.path.name,
        "multiscale": True,
        "rgb": True,
        "contrast_limits": [0, 255],  # auto-contrast on a lazy pyramid would read the whole slide
        "metadata": meta,
    }
    if slide.has_mpp:
        mx, my = slide.mpp_xy
        kwargs["scale"] = (my, mx)
        kwargs["units"] = ("um", "um")
    return slide.levels, kwargs, "image"


def read_slide(path) -> list[tuple]:
    if isinstance(path, list | tuple):
        path = path[0]
    slide = _open_cached(path)
    return [slide_layer_data(slide)]
