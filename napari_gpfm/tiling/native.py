"""Decode a slide level one native (file) tile at a time, from any thread, in parallel.

tiffslide exposes each level as a zarr array. zarr 3 runs every chunk read on one event-loop
thread, so reads issued from several threads decode one after another: on a 20000 px synthetic
slide, zarr chunk reads gave 500-1000 tiles/s whatever the thread count, direct decoding about
2700 tiles/s per thread (docs/benchmarks.md, "Tile loader", has the full comparison). For
plain tiled pages this module therefore reads a tile's bytes with ``pread`` and decodes them
with the page's own tifffile codec (the very call tiffslide's zarr store makes, JPEG tables and
colour space included), which releases the GIL and scales with threads. Anything else (strips,
composited series, planar data) goes through the zarr array. Either way the pixels are those of
:meth:`Slide.read_region`: when a reader opens, one stored tile is decoded both ways, and any
difference makes the reader use zarr.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from napari_gpfm.errors import SlideError
from napari_gpfm.slides.slide import _to_rgb


class ReaderClosed(RuntimeError):
    """A tile was asked of a reader that was closed (its loader was closed meanwhile)."""


@dataclass(frozen=True)
class ChunkGrid:
    """The native tile layout of one level: tile (height, width) and counts of rows/cols."""

    height: int  # level height in px
    width: int
    tile_h: int
    tile_w: int

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile_h)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile_w)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def bounds(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a tile, clipped to the level."""
        y0, x0 = row * self.tile_h, col * self.tile_w
        return y0, min(y0 + self.tile_h, self.height), x0, min(x0 + self.tile_w, self.width)


class NativeTileReader:
    """Reads whole native tiles of one level of a :class:`~napari_gpfm.slides.Slide`.

    ``decode(row, col)`` returns the tile clipped to the level, ``(h, w, 3) uint8``. Thread-safe;
    ``direct`` tells whether tiles bypass zarr. Call :meth:`close` to release the file handle.
    """

    def __init__(self, slide, level: int):
        self.slide = slide
        self.level = int(level)
        self._array = slide._zarr_level(self.level)
        shape = self._array.shape
        chunks = self._array.chunks
        self.grid = ChunkGrid(int(shape[0]), int(shape[1]), int(chunks[0]), int(chunks[1]))
        self._fill = int(self._array.fill_value or 0)
        self._fd: int | None = None
        self._fh = None
        self._fh_lock = threading.Lock()
        # Reads in progress; close() waits for them so a file descriptor is never reused
        # under a pread that is still running.
        self._busy = threading.Condition()
        self._active = 0
        self._closed = False
        self._page = self._direct_page()
        if self._page is not None and not self._direct_matches_zarr():
            self._page = None
            self._close_files()

    @property
    def direct(self) -> bool:
        return self._page is not None

    # ------------------------------------------------------------------ setup
    def _direct_page(self):
        """The tifffile page holding this level when it can be decoded tile by tile, else None."""
        ts = self.slide._ts
        props = ts.properties
        if props.get("tiffslide.series-composition"):
            return None
        try:
            series = ts.ts_tifffile.series[int(props.get("tiffslide.series-index", 0) or 0)]
            level = series.levels[self.level]
        except (IndexError, AttributeError, TypeError, ValueError):
            return None
        if len(level.pages) != 1:
            return None
        page = level.pages[0]
        kf = level.keyframe
        if page is None or not getattr(page, "dataoffsets", None):
            return None
        expected = (self.grid.height, self.grid.width)
        if (
            not kf.is_tiled
            or kf.planarconfig != 1
            or kf.imagedepth != 1
            or kf.dtype != np.uint8
            or (kf.imagelength, kf.imagewidth) != expected
            or (kf.tilelength, kf.tilewidth) != (self.grid.tile_h, self.grid.tile_w)
            or len(page.dataoffsets) != self.grid.count
        ):
            return None
        if hasattr(os, "pread"):
            self._fd = os.open(self.slide.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        else:  # pragma: no cover - Windows has no pread: one shared handle under a lock
            self._fh = open(self.slide.path, "rb")  # noqa: SIM115 - closed in close()
        return page

    # ------------------------------------------------------------------ reading
    def decode(self, row: int, col: int) -> np.ndarray:
        """The native tile at ``(row, col)``, clipped to the level, as ``(h, w, 3) uint8``."""
        y0, y1, x0, x1 = self.grid.bounds(row, col)
        with self._busy:
            if self._closed:
                raise ReaderClosed(f"the tile reader of {self.slide.path} is closed")
            self._active += 1
        try:
            page = self._page
            if page is None:
                return self._via_zarr(y0, y1, x0, x1)
            return self._decode_direct(page, row, col, y1 - y0, x1 - x0)
        finally:
            with self._busy:
                self._active -= 1
                self._busy.notify_all()

    def _via_zarr(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.ascontiguousarray(_to_rgb(np.asarray(self._array[y0:y1, x0:x1])))

    def _decode_direct(self, page, row: int, col: int, h: int, w: int) -> np.ndarray:
        index = row * self.grid.cols + col
        offset = int(page.dataoffsets[index])
        count = int(page.databytecounts[index])
        if offset == 0 or count == 0:  # a tile the scanner never wrote
            return np.full((h, w, 3), self._fill, dtype=np.uint8)
        data = self._read_bytes(offset, count)
        kf = page.keyframe
        try:
            decoded = kf.decode(data, index, jpegtables=page.jpegtables,
                                jpegheader=kf.jpegheader, _fullsize=True)[0]
        except Exception as exc:  # codec errors come in many types; all mean a damaged tile
            raise SlideError(
                f"{self.slide.path}: tile ({row}, {col}) of level {self.level} cannot be decoded "
                f"({type(exc).__name__}); the file is damaged"
            ) from None
        if decoded is None:
            return np.full((h, w, 3), self._fill, dtype=np.uint8)
        tile = decoded.reshape(decoded.shape[-3:]) if decoded.ndim > 3 else decoded
        return np.ascontiguousarray(_to_rgb(tile[:h, :w]))

    def _read_bytes(self, offset: int, count: int) -> bytes:
        if self._fd is not None:
            data = os.pread(self._fd, count, offset)
        else:  # pragma: no cover - Windows path
            with self._fh_lock:
                self._fh.seek(offset)
                data = self._fh.read(count)
        if len(data) != count:
            raise SlideError(f"{self.slide.path} is truncated: a tile at byte {offset:,} is cut off")
        return data

    def _direct_matches_zarr(self) -> bool:
        """Decode the first stored tile both ways: any difference means the zarr path rules."""
        page = self._page
        counts = page.databytecounts
        index = next((i for i, c in enumerate(counts) if c and page.dataoffsets[i]), None)
        if index is None:
            return False
        row, col = divmod(index, self.grid.cols)
        y0, y1, x0, x1 = self.grid.bounds(row, col)
        try:
            tile = self._decode_direct(page, row, col, y1 - y0, x1 - x0)
        except SlideError:
            return False
        reference = self._via_zarr(y0, y1, x0, x1)
        return reference.shape == tile.shape and np.array_equal(reference, tile)

    # ------------------------------------------------------------------ lifecycle
    def _close_files(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Wait for reads in progress, then release the file; later reads raise ReaderClosed."""
        with self._busy:
            self._closed = True
            while self._active:
                self._busy.wait()
        self._page = None
        self._close_files()

    def __enter__(self) -> NativeTileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
