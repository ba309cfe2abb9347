"""Whole-slide images opened lazily through tiffslide, as a zarr-backed dask pyramid.

A :class:`Slide` never holds more than the pixels a caller asks for. It checks the file up
front (exists, is a TIFF, is not truncated, is a pyramid or small enough, is 8-bit) so that a
bad file fails with one readable line at open time instead of deep inside a read later.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import GPFMError, ParameterError, SlideError

_log = logging.getLogger(__name__)

# Formats tiffslide reads; the napari reader uses the same list for its filename patterns.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".scn", ".bif")

# A single-level image larger than this (in pixels) must be pyramidal: reading a thumbnail or a
# low-resolution overview would otherwise decode the whole image.
MAX_FLAT_PIXELS = 12_000 * 12_000

# Dask chunks are whole native tiles grouped to at least this many pixels a side: fewer, larger
# chunks keep the dask graph small, and whole tiles mean each JPEG tile is decoded once.
MIN_CHUNK = 512
# Strip-organised files (one chunk = a few rows) are regrouped into square chunks of this size.
STRIP_CHUNK = 1024

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OTHER_MAGICS = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"PK\x03\x04": "a ZIP archive",
    b"%PDF": "a PDF document",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"DICM": "a DICOM file",
}


def _describe_magic(head: bytes) -> str:
    for magic, what in _OTHER_MAGICS.items():
        if head.startswith(magic):
            return what
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    try:
        head[:64].decode("ascii")
        return "a text file"
    except UnicodeDecodeError:
        return "not a TIFF file"


def is_pixel_size(value: Any) -> bool:
    """Whether ``value`` is a plausible level-0 pixel size in microns (0.01 to 100)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.01 <= value <= 100
    )


def _first_line(exc: BaseException, messages: list[logging.LogRecord]) -> str:
    """The most telling one-line detail: what tifffile logged first, else the exception."""
    if messages:
        return f"tifffile: {messages[0].getMessage().splitlines()[0]}"
    text = str(exc).splitlines()[0] if str(exc) else "no detail"
    return f"{type(exc).__name__}: {text}"


def _check_path(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"slide not found: {path} (check the path)")
    if path.is_dir():
        raise SlideError(
            f"{path} is a directory, not a slide file; pass a .svs/.tif/.ndpi file "
            "(the CLI commands that take several slides accept folders explicitly)"
        )
    size = path.stat().st_size
    if size == 0:
        raise SlideError(f"{path} is empty (0 bytes); the copy or download is incomplete")
    with open(path, "rb") as fh:
        head = fh.read(256)
    if not any(head.startswith(m) for m in _TIFF_MAGICS):
        raise SlideError(
            f"{path} is {_describe_magic(head)}, not a TIFF-based slide; napari-gpfm reads Aperio "
            "SVS, NDPI, OME-TIFF and tiled pyramidal TIFF"
        )


def _check_not_truncated(path: Path, tif: Any) -> None:
    """A truncated file still parses its first IFDs; its tiles or later IFDs lie past its end.

    Pyramid levels stored in SubIFDs are checked too: tifffile silently drops a level whose IFD
    is missing, which would make a cut-off pyramid look like a valid one with fewer levels.
    """
    size = path.stat().st_size
    if len(tif.pages) == 0:
        raise SlideError(
            f"{path} is truncated or corrupted: it holds no readable image; "
            "copy or download it again"
        )
    pages = list(tif.pages)
    for series in tif.series:
        for level in series.levels:
            pages.extend(level.pages)
    for page in pages:
        if page is None:
            continue
        beyond = [o for o in (getattr(page, "subifds", None) or ()) if o >= size]
        if beyond:
            raise SlideError(
                f"{path} is truncated: a pyramid level starts at byte {beyond[0]:,} but the file "
                f"has {size:,} bytes; copy or download it again"
            )
        offsets = getattr(page, "dataoffsets", ())
        counts = getattr(page, "databytecounts", ())
        if not offsets:
            continue
        end = max(o + c for o, c in zip(offsets, counts, strict=False))
        if end > size:
            raise SlideError(
                f"{path} is truncated: its image data ends at byte {end:,} but the file has "
                f"{size:,} bytes; copy or download it again"
            )


class _ThreadRecords(logging.Handler):
    """Collects the log records that one thread emits (other threads' records are ignored)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)


@contextlib.contextmanager
def _tifffile_messages() -> Iterator[list[logging.LogRecord]]:
    """Catch what tifffile logs while it parses a file.

    tifffile reports a damaged file by logging warnings and carrying on; without a handler
    Python prints them to stderr, around the one-line error the user should see. Collected
    here, they become the detail of that error, or a warning on our logger if the file opens.
    """
    handler = _ThreadRecords()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of the file size and its first and last MiB: cheap, and changes with the content.

    Hashing a multi-GB slide whole would take longer than embedding it on a GPU; the header
    (IFDs, tile offsets) and the tail are where two different slides always differ.
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(chunk, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()


def _chunks_for(native: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """Dask chunk (rows, cols): whole native tiles, at least MIN_CHUNK, strips regrouped.

    A strip (a few rows, or a band as wide as the image) becomes square blocks of about
    STRIP_CHUNK a side: a viewer showing part of the image then decodes a block, not rows
    spanning the whole width, and the dask graph stays small.
    """
    rows, cols = max(1, int(native[0])), max(1, int(native[1]))
    height, width = int(shape[0]), int(shape[1])
    is_strip = rows < 64 or (rows < cols and cols >= width > STRIP_CHUNK and rows < height)
    if is_strip:
        r = rows * max(1, round(STRIP_CHUNK / rows))
        c = STRIP_CHUNK
    else:
        r = rows * max(1, math.ceil(MIN_CHUNK / rows))
        c = cols * max(1, math.ceil(MIN_CHUNK / cols))
    return min(r, height), min(c, width)


class Slide:
    """A whole-slide image: metadata, a lazy RGB pyramid, and region reads at any resolution.

    Open with :func:`open_slide`. Coordinates are level-0 pixels ``(x, y)``; arrays are
    indexed ``[y, x]`` and are ``uint8`` RGB.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None,
                 default_mpp: float | None = None):
        import tiffslide

        self.path = Path(path).expanduser()
        _check_path(self.path)
        self._ts = None
        with _tifffile_messages() as messages:
            try:
                self._ts = tiffslide.TiffSlide(str(self.path))
                self._validate()
            except GPFMError:
                self.close()
                raise
            except NotImplementedError as exc:  # tiffslide: a valid TIFF it cannot lay out
                self.close()
                raise SlideError(
                    f"{self.path} is not a layout napari-gpfm can read as a slide "
                    f"({str(exc).splitlines()[0] if str(exc) else 'unsupported'}); "
                    "convert it to a tiled pyramidal RGB TIFF"
                ) from None
            except Exception as exc:  # tifffile raises many kinds; all mean "cannot parse"
                self.close()
                raise SlideError(
                    f"cannot read {self.path} as a slide: the file is corrupted or truncated "
                    f"({_first_line(exc, messages)}); copy or download it again"
                ) from None
        for record in messages:  # the file opened: tifffile's complaints were not fatal
            _log.warning("%s: %s", self.path, record.getMessage())
        for value, name in ((mpp, "mpp"), (default_mpp, "default_mpp")):
            if value is not None and not is_pixel_size(value):
                self.close()
                raise ParameterError(
                    f"{name}={value!r} for {self.path} is not a pixel size: pass the level-0 "
                    "microns per pixel, between 0.01 and 100 (about 0.25 for 40x, 0.5 for 20x)"
                )
        self._mpp_xy: tuple[float, float] | None
        if mpp is not None:
            self._mpp_xy, self.mpp_source = (float(mpp), float(mpp)), "user"
        else:
            self._mpp_xy = self._mpp_from_metadata()
            self.mpp_source = "metadata" if self._mpp_xy else None
            if self._mpp_xy is None and default_mpp is not None:
                self._mpp_xy = (float(default_mpp), float(default_mpp))
                self.mpp_source = "user"
        self._levels: list | None = None
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        tif = self._ts.ts_tifffile
        _check_not_truncated(self.path, tif)
        arr = self._zarr_level(0)
        self._axes = str(self._ts.properties.get("tiffslide.series-axes") or "YXS")
        if arr.dtype != np.uint8:
            raise SlideError(
                f"{self.path} has {arr.dtype} pixels ({arr.dtype.itemsize * 8}-bit); napari-gpfm "
                "reads 8-bit brightfield (H&E) slides: convert it to 8-bit RGB first"
            )
        if self._axes not in ("YXS", "YX"):
            raise SlideError(
                f"{self.path} is a multi-channel image (axes {self._axes}), not a brightfield "
                "RGB slide; fluorescence stacks are not supported"
            )
        self._channels = 1 if self._axes == "YX" else int(arr.shape[2])
        if self._channels not in (1, 3, 4):
            raise SlideError(
                f"{self.path} has {self._channels} samples per pixel; expected RGB (3), "
                "RGBA (4) or grayscale (1)"
            )
        w, h = self._ts.dimensions
        page0 = tif.series[0].levels[0].keyframe if tif.series else tif.pages[0]
        if self._ts.level_count == 1 and w * h > MAX_FLAT_PIXELS and not page0.is_tiled:
            raise SlideError(
                f"{self.path} is a single-resolution, untiled image of {w} x {h} px; napari-gpfm "
                "needs a tiled pyramid for images this large: convert it, e.g. "
                "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90`"
            )

    def _mpp_from_metadata(self) -> tuple[float, float] | None:
        props = self._ts.properties
        pair = _pixel_size_pair(props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y"))
        if pair is None:
            # OME-TIFF writers (bfconvert, tifffile, QuPath) may record it only in the OME-XML.
            tif = self._ts.ts_tifffile
            return _mpp_from_ome_xml(tif.ome_metadata) if tif.is_ome else None
        return pair

    # ------------------------------------------------------------------ metadata
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return tuple(int(v) for v in self._ts.dimensions)  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return int(self._ts.level_count)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(w), int(h)) for w, h in self._ts.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._ts.level_downsamples]

    @property
    def has_mpp(self) -> bool:
        return self._mpp_xy is not None

    @property
    def mpp_xy(self) -> tuple[float, float]:
        if self._mpp_xy is None:
            raise SlideError(
                f"{self.path} has no pixel size (microns per pixel) in its metadata; pass the "
                "slide's own (0.25 for 40x, 0.5 for 20x scans): `open_slide(path, mpp=0.25)` in "
                "Python, `--slide-mpp 0.25` to gpfm embed / tiles / eval / demo and gpfm-train embed, "
                "`--mpp 0.25` to gpfm info, the `mpp` column of a gpfm-train manifest"
            )
        return self._mpp_xy

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel (mean of x and y)."""
        x, y = self.mpp_xy
        return (x + y) / 2

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    @property
    def objective_power(self) -> float | None:
        v = self._ts.properties.get("tiffslide.objective-power")
        try:
            return float(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None

    @property
    def vendor(self) -> str | None:
        return self._ts.properties.get("tiffslide.vendor") or None

    @property
    def properties(self) -> Mapping[str, Any]:
        return self._ts.properties

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro, thumbnail... as RGB arrays (decoded on access)."""
        out = {}
        for key in self._ts.associated_images:
            if not key:  # tiffslide lists an untitled extra page as ''
                continue
            try:
                img = self._ts.associated_images[key]
                out[key] = np.asarray(img.convert("RGB"))
            except Exception:  # a damaged label image must not make the slide unreadable
                continue
        return out

    @property
    def associated_image_names(self) -> list[str]:
        return [k for k in self._ts.associated_images if k]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.path)
        return self._fingerprint

    def info(self) -> dict[str, Any]:
        """Metadata as plain JSON-able values (what `gpfm info --json` prints)."""
        return {
            "path": str(self.path),
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": self.level_downsamples,
            "mpp_x": self._mpp_xy[0] if self._mpp_xy else None,
            "mpp_y": self._mpp_xy[1] if self._mpp_xy else None,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "vendor": self.vendor,
            "channels": self._channels,
            "associated_images": self.associated_image_names,
            "native_tile": list(self.native_tile(0)),
            "file_size": self.path.stat().st_size,
        }

    # ------------------------------------------------------------------ pixels
    def _zarr_level(self, level: int):
        if self._ts is None:
            raise SlideError(f"{self.path} was closed; open it again with open_slide()")
        # tiffslide caches its zarr group per thread, so this is safe from loader threads.
        return self._ts.zarr_group[str(level)]

    def native_tile(self, level: int) -> tuple[int, int]:
        """(height, width) of the file's own tiles (or strips) at a level."""
        arr = self._zarr_level(level)
        return int(arr.chunks[0]), int(arr.chunks[1])

    @property
    def levels(self) -> list:
        """The pyramid as dask arrays (H, W, 3) uint8, chunked on whole native tiles."""
        with self._lock:
            if self._levels is None:
                self._levels = [self._dask_level(i) for i in range(self.level_count)]
        return self._levels

    def _dask_level(self, level: int):
        import dask.array as da

        arr = self._zarr_level(level)
        native = (int(arr.chunks[0]), int(arr.chunks[1]))
        chunks = _chunks_for(native, (int(arr.shape[0]), int(arr.shape[1])))
        if arr.ndim == 3:
            d = da.from_zarr(arr, chunks=(chunks[0], chunks[1], arr.shape[2]))
        else:
            d = da.from_zarr(arr, chunks=chunks)
        return d.map_blocks(_to_rgb, dtype=np.uint8, chunks=(*d.chunks[:2], (3,)),
                            new_axis=2 if d.ndim == 2 else None) if self._channels != 3 else d

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size=(w, h)`` pixels of ``level`` whose top-left is level-0 ``location=(x, y)``.

        Parts outside the image are white (the colour of glass), like a scanner's background.
        """
        if not 0 <= level < self.level_count:
            raise ParameterError(f"level={level} is out of range for {self.name} (0..{self.level_count - 1})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ParameterError(f"region size {size} must be positive")
        ds = self.level_downsamples[level]
        x0 = int(math.floor(location[0] / ds))
        y0 = int(math.floor(location[1] / ds))
        arr = self._zarr_level(level)
        H, W = int(arr.shape[0]), int(arr.shape[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + w, W), min(y0 + h, H)
        if xa < xb and ya < yb:
            try:
                block = np.asarray(arr[ya:yb, xa:xb])
            except Exception as exc:  # a damaged tile inside an otherwise valid file
                raise SlideError(
                    f"cannot decode pixels of {self.path} at level {level}, x {xa}-{xb}, "
                    f"y {ya}-{yb}: the file is damaged there ({type(exc).__name__}); "
                    "re-export or re-scan the slide"
                ) from None
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = _to_rgb(block)
        return out

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is still at least as sharp as ``downsample`` (1% tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    def read_region_mpp(self, location: tuple[int, int], size_px: int, mpp: float) -> np.ndarray:
        """A ``size_px`` square at ``mpp`` um/px whose top-left is level-0 ``location``."""
        if mpp <= 0:
            raise ParameterError(f"mpp={mpp} must be positive")
        target_ds = mpp / self.mpp
        level = self.best_level_for_downsample(target_ds)
        ds = self.level_downsamples[level]
        span = size_px * target_ds / ds  # pixels to read at that level
        n = max(1, int(round(span)))
        region = self.read_region(location, level, (n, n))
        if n == size_px:
            return region
        return resize_rgb(region, size_px)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """An RGB overview whose longer side is at most ``max_size`` pixels."""
        w, h = self.dimensions
        ds = max(w, h) / max_size
        level = self.best_level_for_downsample(max(ds, 1.0))
        lw, lh = self.level_dimensions[level]
        scale = max(lw, lh) / max_size
        d = self.levels[level]
        if scale > 2:  # stride through a big level chunk by chunk instead of loading it whole
            step = int(scale // 2)
            d = d[::step, ::step]
        img = np.asarray(d.compute(scheduler="threads"))
        tw = max(1, int(round(w / ds))) if ds > 1 else w
        th = max(1, int(round(h / ds))) if ds > 1 else h
        if img.shape[1] == tw and img.shape[0] == th:
            return img
        from PIL import Image

        return np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.BOX))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        ts = getattr(self, "_ts", None)
        if ts is not None:
            ts.close()
            self._ts = None  # type: ignore[assignment]

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if getattr(self, "_ts", None) is None:
            return f"Slide({self.path.name!r}, closed)"
        w, h = self.dimensions
        mpp = f"{self.mpp:.3f} um/px" if self.has_mpp else "mpp unknown"
        return f"Slide({self.path.name!r}, {w}x{h}, {self.level_count} levels, {mpp})"


def _to_rgb(block: np.ndarray) -> np.ndarray:
    """Grayscale -> RGB by replication; RGBA -> RGB composited on white (the glass colour)."""
    if block.ndim == 2:
        return np.repeat(block[..., None], 3, axis=2)
    c = block.shape[2]
    if c == 3:
        return block
    if c == 1:
        return np.repeat(block, 3, axis=2)
    if c == 4:
        a = block[..., 3:4].astype(np.uint16)
        rgb = block[..., :3].astype(np.uint16)
        return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    raise ValueError(f"unexpected channel count {c}")


def resize_rgb(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to ``size`` (square int or (w, h)) with antialiasing."""
    from PIL import Image

    wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if img.shape[1] == wh[0] and img.shape[0] == wh[1]:
        return img
    return np.asarray(Image.fromarray(img).resize(wh, Image.Resampling.BILINEAR, reducing_gap=None))


# OME's length units, in microns (the schema's default unit is the micron).
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3,
                "cm": 1e4, "m": 1e6}


def _mpp_from_ome_xml(xml: str | None) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first image's Pixels in an OME-XML document, in um/px."""
    import xml.etree.ElementTree as ET

    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        try:
            value = float(pixels.get(f"PhysicalSize{axis}", "nan"))
        except ValueError:
            value = math.nan
        sizes.append(value * _OME_UNIT_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"),
                                              math.nan))
    return _pixel_size_pair(*sizes)


def _pixel_size_pair(x: Any, y: Any) -> tuple[float, float] | None:
    """(x, y) um/px from two recorded values: one missing or implausible one takes the other's
    value; None if neither is a pixel size."""
    values = []
    for value in (x, y):
        try:
            value = float(value) if value is not None else None
        except (TypeError, ValueError):
            value = None
        values.append(value if is_pixel_size(value) else None)
    if values[0] is None and values[1] is None:
        return None
    x_um = values[0] if values[0] is not None else values[1]
    y_um = values[1] if values[1] is not None else values[0]
    return float(x_um), float(y_um)


def open_slide(
    path: str | os.PathLike, mpp: float | None = None, *, default_mpp: float | None = None
) -> Slide:
    """Open a whole-slide image lazily. ``mpp`` overrides (or supplies) the level-0 pixel size;
    ``default_mpp`` only supplies it to a file that records none (a folder of mixed slides)."""
    return Slide(path, mpp=mpp, default_mpp=default_mpp)
