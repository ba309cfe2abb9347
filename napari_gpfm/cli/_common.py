"""Small helpers shared by the `gpfm` subcommands."""

from __future__ import annotations

from pathlib import Path

from napari_gpfm.errors import ParameterError


def slide_pixel_size(text: str) -> float:
    """argparse type of ``--slide-mpp``: refused under its own name, not the reader's."""
    import argparse

    from napari_gpfm.slides import is_pixel_size

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not is_pixel_size(value):
        raise argparse.ArgumentTypeError(
            f"{text} is not a pixel size: pass the level-0 microns per pixel, between 0.01 and "
            "100 (about 0.25 for 40x, 0.5 for 20x scans)"
        )
    return value


def parse_roi(text: str):
    """``x,y,w,h`` (rectangle) or ``x,y`` (point), level-0 pixels -> Roi."""
    from napari_gpfm.analysis.geometry import Roi

    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) == 4:
        return Roi.rectangle(*vals)
    if len(vals) == 2:
        return Roi.point(*vals)
    raise ParameterError(
        f"--roi {text!r} must be 'x,y,w,h' (a rectangle) or 'x,y' (a point) in level-0 pixels"
    )


def roi_on_slide(roi, store):
    """``roi``, refused in words when it lies wholly outside the slide of ``store`` (a typo in
    a coordinate would otherwise read as "no tissue there")."""
    dims = store.attrs.get("slide_dimensions") or []
    if len(dims) == 2:
        x, y, w, h = roi.bounds
        width, height = int(dims[0]), int(dims[1])
        if x > width or y > height or x + w < 0 or y + h < 0:
            given = f"{x:g},{y:g}" if w == h == 0 else f"{x:g},{y:g},{w:g},{h:g}"
            raise ParameterError(
                f"--roi {given} lies outside the {width} x {height} px slide "
                f"of {store.path}; give level-0 pixels inside it"
            )
    return roi


def open_store(path: str | Path):
    from napari_gpfm.embedding.store import EmbeddingStore
    from napari_gpfm.errors import StoreError

    p = Path(path)
    if not p.exists():
        raise StoreError(f"embedding store not found: {p}; make one with `gpfm embed SLIDE`")
    return EmbeddingStore.open(p)


def slide_thumbnail(store, max_size: int = 1600):
    """The store's slide as a thumbnail, or None when the slide file is not at hand."""
    from napari_gpfm.slides import open_slide

    path = store.attrs.get("slide_path")
    if not path or not Path(path).is_file():
        return None
    with open_slide(path, mpp=store.attrs.get("slide_mpp")) as slide:
        if slide.fingerprint != store.attrs.get("slide_fingerprint"):
            return None  # the file at that path changed since it was embedded
        return slide.thumbnail(max_size)


MAP_SUFFIXES = (".png", ".tif", ".tiff")

# What `gpfm` prints on Ctrl-C (set per command as the parser default `interrupted`).
RESUMES = "interrupted: finished work is saved; run the same command again to resume"
ALL_OR_NOTHING = ("interrupted: a library changes all at once or not at all; `gpfm index info "
                  "LIB` shows which, and the same command again finishes it")


def _map_suffix(path: str | Path, flag: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in MAP_SUFFIXES:
        raise ParameterError(f"{flag} {path}: use a .png (picture) or .tif (raw values) file name")
    return suffix


def check_map_path(path: str | Path, flag: str = "--out") -> Path:
    """A map's output path, refused before any work unless it is a writable .png or .tif."""
    from napari_gpfm.analysis._io import check_output_path

    _map_suffix(path, flag)
    return check_output_path(path, "the map")


def write_view(view, out: str | Path, thumbnail=None, cmap: str = "viridis",
               flag: str = "--out") -> Path:
    """A StoreView as PNG (over the thumbnail) or as a float/label TIFF, by file suffix."""
    from napari_gpfm.analysis.rasters import write_map_png, write_map_tiff

    out = Path(out)
    suffix = _map_suffix(out, flag)  # the writers check the path itself, atomically
    if suffix == ".png":
        kwargs = {}
        if view.colours is not None:
            kwargs["colours"] = view.colours
        elif view.kind == "similarity":
            kwargs.update(vmin=float(view.values.min()), vmax=float(view.values.max()))
        return write_map_png(out, view.raster, thumbnail=thumbnail, cmap=cmap, **kwargs)
    # .tif / .tiff, the other suffixes _map_suffix admits
    extra = {"kind": view.kind, **{k: v for k, v in view.provenance.items() if k != "tiling"}}
    if view.class_names:
        extra["class_names"] = view.class_names
    return write_map_tiff(out, view.raster, mpp=view.provenance.get("slide_mpp"), extra=extra)
