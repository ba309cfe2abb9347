"""Per-tile values painted into a low-resolution grid aligned with the slide.

The grid has one cell per tiling stride. Cell ``(row, col)`` covers level-0 pixels
``x in [tx + col * sx, tx + (col + 1) * sx)`` and ``y in [ty + row * sy, ty + (row + 1) * sy)``
where ``(ty, tx) = translate_yx`` and ``(sy, sx) = scale_yx``. A tile paints every cell whose
centre lies inside the tile, so overlapping tiles (stride < tile size) are averaged per cell.

napari draws data pixel ``i`` *centred* on ``translate + i * scale``; the slide layer's level-0
pixel ``x`` is therefore centred on ``x * mpp``. :meth:`TileRaster.napari_transform` converts the
top-left convention above into that pixel-centre convention so the overlay lines up exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_gpfm.analysis._io import atomic_output
from napari_gpfm.analysis.colours import apply_colormap, categorical_colours
from napari_gpfm.analysis.geometry import as_coords, check_tile_size
from napari_gpfm.errors import ParameterError

RASTER_FORMAT = "napari-gpfm/tile-raster"
_EPS = 1e-9


def _mpp_yx(mpp: float | Sequence[float]) -> tuple[float, float]:
    """Accept one mpp or ``(mpp_x, mpp_y)``; return ``(mpp_y, mpp_x)``."""
    arr = np.atleast_1d(np.asarray(mpp, dtype=np.float64))
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ParameterError(f"mpp={mpp!r} must be a positive number or a (mpp_x, mpp_y) pair")
    return (float(arr[1]), float(arr[0]))


@dataclass(frozen=True, eq=False)
class TileRaster:
    """A per-tile map on a grid of stride-sized cells.

    ``data`` is ``(rows, cols)`` or ``(rows, cols, C)`` (float32 values, or int32 labels with -1
    for empty cells); ``counts`` says how many tiles painted each cell.
    """

    data: np.ndarray
    scale_yx: tuple[float, float]
    translate_yx: tuple[float, float]
    slide_dims: tuple[int, int]
    tile_size_l0: float
    counts: np.ndarray | None = field(default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def scale_um(self, mpp: float | Sequence[float]) -> tuple[float, float]:
        """Cell size in micrometres, ``(y, x)``."""
        my, mx = _mpp_yx(mpp)
        return (self.scale_yx[0] * my, self.scale_yx[1] * mx)

    def translate_um(self, mpp: float | Sequence[float]) -> tuple[float, float]:
        """Top-left of cell (0, 0) in micrometres, ``(y, x)``."""
        my, mx = _mpp_yx(mpp)
        return (self.translate_yx[0] * my, self.translate_yx[1] * mx)

    def napari_transform(self, mpp: float | Sequence[float] | None = None) -> dict:
        """``{"scale": (y, x), "translate": (y, x)}`` for a napari layer over the slide.

        Assumes the slide layer shows level 0 with ``scale=(mpp, mpp)`` (or 1 when ``mpp`` is
        None) and no translate, i.e. level-0 pixel ``x`` is centred on world ``x * mpp``.
        """
        my, mx = (1.0, 1.0) if mpp is None else _mpp_yx(mpp)
        sy, sx = self.scale_yx
        ty, tx = self.translate_yx
        # Centre of cell 0 in level-0 pixel-index space is t + s/2 - 1/2.
        return {
            "scale": (sy * my, sx * mx),
            "translate": ((ty + sy / 2.0 - 0.5) * my, (tx + sx / 2.0 - 0.5) * mx),
        }

    def cell_of(self, x: float, y: float) -> tuple[int, int]:
        """``(row, col)`` of the cell holding level-0 point ``(x, y)`` (may be out of range)."""
        col = int(np.floor((x - self.translate_yx[1]) / self.scale_yx[1] + _EPS))
        row = int(np.floor((y - self.translate_yx[0]) / self.scale_yx[0] + _EPS))
        return (row, col)

    def metadata(self, mpp: float | Sequence[float] | None = None) -> dict:
        """JSON-ready description of the grid (what :func:`write_map_tiff` records)."""
        meta = {
            "format": RASTER_FORMAT,
            "version": 1,
            "units": "level-0 px",
            "scale_yx": list(self.scale_yx),
            "translate_yx": list(self.translate_yx),
            "slide_dims": list(self.slide_dims),
            "tile_size_l0": self.tile_size_l0,
            "shape": list(self.shape),
        }
        if mpp is not None:
            my, mx = _mpp_yx(mpp)
            meta["mpp_yx"] = [my, mx]
            meta["scale_um_yx"] = list(self.scale_um(mpp))
            meta["translate_um_yx"] = list(self.translate_um(mpp))
        return meta


def _cell_ranges(
    start: np.ndarray, size: float, origin: float, step: float
) -> tuple[np.ndarray, np.ndarray]:
    """First cell and cell count, per tile, along one axis (cells whose centre is in the tile)."""
    first = np.ceil((start - origin) / step - 0.5 - _EPS).astype(np.int64)
    stop = np.ceil((start + size - origin) / step - 0.5 - _EPS).astype(np.int64)
    # A tile smaller than the stride may hold no cell centre: give it the cell under its centre.
    empty = stop <= first
    if np.any(empty):
        first = np.where(
            empty, np.floor((start + size / 2.0 - origin) / step).astype(np.int64), first
        )
        stop = np.where(empty, first + 1, stop)
    return first, stop - first


def tile_raster(
    coords: np.ndarray,
    tile_size_l0: float,
    values: np.ndarray,
    slide_dims: tuple[int, int],
    stride_l0: float | None = None,
    fill: float = np.nan,
) -> TileRaster:
    """Paint per-tile ``values`` (``(N,)`` or ``(N, C)``) into a stride-resolution grid.

    The grid covers the whole slide (``slide_dims = (width, height)``); its phase follows the
    tiles so that, for a regular tiling, each tile starts exactly on a cell edge. Cells under
    several tiles get the mean of their finite values; cells under none get ``fill``.
    """
    xy = as_coords(coords)
    size = check_tile_size(tile_size_l0)
    step = size if stride_l0 is None else check_tile_size(stride_l0)
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim not in (1, 2) or vals.shape[0] != len(xy):
        raise ParameterError(
            f"values must have shape (N,) or (N, C) with N={len(xy)} tiles, got {vals.shape}"
        )
    width, height = (int(v) for v in slide_dims)
    if width <= 0 or height <= 0:
        raise ParameterError(f"slide_dims={slide_dims!r} must be a positive (width, height)")
    channels = vals.reshape(len(xy), -1)

    origin = np.mod(xy.min(axis=0), step) if len(xy) else np.zeros(2)
    tx, ty = float(origin[0]), float(origin[1])
    col0, ncol = _cell_ranges(xy[:, 0], size, tx, step)
    row0, nrow = _cell_ranges(xy[:, 1], size, ty, step)
    cols = max(int(np.ceil((width - tx) / step - _EPS)), int((col0 + ncol).max(initial=0)), 1)
    rows = max(int(np.ceil((height - ty) / step - _EPS)), int((row0 + nrow).max(initial=0)), 1)

    n_cells = rows * cols
    sums = np.zeros((channels.shape[1], n_cells))
    hits = np.zeros((channels.shape[1], n_cells))
    counts = np.zeros(n_cells)
    finite = np.isfinite(channels)
    clean = np.where(finite, channels, 0.0)
    for dr in range(int(nrow.max(initial=0))):
        for dc in range(int(ncol.max(initial=0))):
            r, c = row0 + dr, col0 + dc
            use = (dr < nrow) & (dc < ncol) & (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
            flat = (r * cols + c)[use]
            counts += np.bincount(flat, minlength=n_cells)
            for ch in range(channels.shape[1]):
                sums[ch] += np.bincount(flat, weights=clean[use, ch], minlength=n_cells)
                hits[ch] += np.bincount(flat, weights=finite[use, ch], minlength=n_cells)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(hits > 0, sums / np.maximum(hits, 1), fill)
    data = mean.T.reshape(rows, cols, channels.shape[1]).astype(np.float32)
    if vals.ndim == 1:
        data = data[..., 0]
    return TileRaster(
        data=data,
        scale_yx=(step, step),
        translate_yx=(ty, tx),
        slide_dims=(width, height),
        tile_size_l0=size,
        counts=counts.reshape(rows, cols).astype(np.int32),
    )


def tile_label_raster(
    coords: np.ndarray,
    tile_size_l0: float,
    labels: np.ndarray,
    n_labels: int,
    slide_dims: tuple[int, int],
    stride_l0: float | None = None,
) -> TileRaster:
    """Paint integer labels (clusters, classes): each cell takes the majority label, -1 if empty.

    Averaging label numbers would invent labels between neighbours; voting does not. Ties go
    to the lower label.
    """
    lab = np.asarray(labels).reshape(-1)
    if lab.size and (lab.min() < 0 or lab.max() >= n_labels):
        raise ParameterError(f"labels must be in [0, {n_labels}), got {lab.min()}..{lab.max()}")
    one_hot = np.zeros((lab.size, int(n_labels)), dtype=np.float64)
    one_hot[np.arange(lab.size), lab.astype(np.int64)] = 1.0
    votes = tile_raster(coords, tile_size_l0, one_hot, slide_dims, stride_l0, fill=0.0)
    data = np.argmax(votes.data, axis=-1).astype(np.int32)
    data[votes.counts == 0] = -1
    return TileRaster(
        data=data,
        scale_yx=votes.scale_yx,
        translate_yx=votes.translate_yx,
        slide_dims=votes.slide_dims,
        tile_size_l0=votes.tile_size_l0,
        counts=votes.counts,
    )


def raster_to_rgba(
    raster: TileRaster,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colours: np.ndarray | None = None,
) -> np.ndarray:
    """Colour a raster as ``(rows, cols, 4)`` uint8; empty cells are fully transparent.

    Integer rasters are labels coloured with ``colours`` (``(k, 3)`` uint8, default the
    categorical palette); 3-channel float rasters are RGB in [0, 1] (e.g. PCA colours);
    single-channel float rasters go through the colour map ``cmap`` over ``[vmin, vmax]``.
    """
    data = raster.data
    if np.issubdtype(data.dtype, np.integer):
        if data.ndim != 2:
            raise ParameterError("a label raster must be 2-D (rows, cols)")
        n = int(data.max(initial=-1)) + 1
        lut = categorical_colours(n) if colours is None else np.asarray(colours, dtype=np.uint8)
        if n > len(lut):
            raise ParameterError(f"label raster has {n} labels but only {len(lut)} colours")
        rgb = lut[np.clip(data, 0, None)] if n else np.zeros(data.shape + (3,), np.uint8)
        valid = data >= 0
    elif data.ndim == 3 and data.shape[2] == 3:
        valid = np.all(np.isfinite(data), axis=2)
        rgb = np.rint(np.clip(np.nan_to_num(data, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    elif data.ndim == 2:
        rgb, valid = apply_colormap(data, cmap, vmin, vmax)
    else:
        raise ParameterError(
            f"cannot colour a raster with {data.shape[-1]} channels; pick one channel or three"
        )
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    return np.dstack([rgb, alpha])


def _as_rgb_image(thumbnail: np.ndarray) -> np.ndarray:
    img = np.asarray(thumbnail)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ParameterError(f"thumbnail must be (H, W, 3) RGB, got shape {img.shape}")
    return img[..., :3].astype(np.uint8)


def overlay_on_thumbnail(
    rgba: np.ndarray, raster: TileRaster, thumbnail: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blend a coloured raster over a whole-slide thumbnail (nearest sampling), RGB uint8.

    Each thumbnail pixel is mapped back to level 0 through the slide size, so the map lands
    where its tiles are even when the thumbnail's aspect ratio was rounded.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ParameterError(f"alpha={alpha} must be between 0 and 1")
    thumb = _as_rgb_image(thumbnail)
    th, tw = thumb.shape[:2]
    width, height = raster.slide_dims
    x_l0 = (np.arange(tw) + 0.5) * (width / tw)
    y_l0 = (np.arange(th) + 0.5) * (height / th)
    cols = np.floor((x_l0 - raster.translate_yx[1]) / raster.scale_yx[1]).astype(np.int64)
    rows = np.floor((y_l0 - raster.translate_yx[0]) / raster.scale_yx[0]).astype(np.int64)
    col_ok = (cols >= 0) & (cols < rgba.shape[1])
    row_ok = (rows >= 0) & (rows < rgba.shape[0])
    sampled = rgba[np.clip(rows, 0, rgba.shape[0] - 1)][:, np.clip(cols, 0, rgba.shape[1] - 1)]
    weight = sampled[..., 3:4].astype(np.float64) / 255.0 * alpha
    weight *= (row_ok[:, None] & col_ok[None, :])[..., None]
    blended = thumb * (1.0 - weight) + sampled[..., :3] * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_map_png(
    path: str | os.PathLike,
    raster: TileRaster,
    thumbnail: np.ndarray | None = None,
    alpha: float = 0.5,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colours: np.ndarray | None = None,
) -> Path:
    """Write the coloured map as PNG: over ``thumbnail`` if given, else RGBA at cell resolution."""
    from PIL import Image

    rgba = raster_to_rgba(raster, cmap=cmap, vmin=vmin, vmax=vmax, colours=colours)
    # Pillow infers RGBA / RGB from the uint8 (H, W, 4) / (H, W, 3) arrays.
    if thumbnail is None:
        image = Image.fromarray(np.ascontiguousarray(rgba))
    else:
        image = Image.fromarray(overlay_on_thumbnail(rgba, raster, thumbnail, alpha))
    with atomic_output(path, "map PNG") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def write_map_tiff(
    path: str | os.PathLike,
    raster: TileRaster,
    mpp: float | Sequence[float] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the raw map (float32, or int32 labels) as TIFF with its grid in the description.

    The ImageDescription holds :meth:`TileRaster.metadata` as JSON (plus ``extra``, e.g. the
    encoder and what the values mean); with ``mpp`` the TIFF resolution tags are set too.
    """
    import tifffile

    data = raster.data
    data = data.astype(np.int32 if np.issubdtype(data.dtype, np.integer) else np.float32)
    meta = raster.metadata(mpp)
    if extra:
        meta["extra"] = extra
    kwargs: dict = {}
    if mpp is not None:
        sy_um, sx_um = raster.scale_um(mpp)
        kwargs = {"resolution": (1e4 / sx_um, 1e4 / sy_um), "resolutionunit": "CENTIMETER"}
    photometric = "rgb" if data.ndim == 3 and data.shape[2] == 3 else "minisblack"
    with atomic_output(path, "map TIFF") as tmp:
        tifffile.imwrite(
            tmp,
            data,
            photometric=photometric,
            description=json.dumps(meta),
            metadata=None,
            software="napari-gpfm",
            **kwargs,
        )
    return Path(path)


def read_map_tiff(path: str | os.PathLike) -> TileRaster:
    """Read a map written by :func:`write_map_tiff` back into a :class:`TileRaster`."""
    import tifffile

    src = Path(path)
    if not src.is_file():
        raise ParameterError(f"map TIFF {src} not found")
    try:
        with tifffile.TiffFile(src) as tif:
            data = tif.pages[0].asarray()
            description = tif.pages[0].description
    except (tifffile.TiffFileError, OSError) as exc:
        raise ParameterError(f"{src} is not a readable TIFF ({exc})") from None
    try:
        meta = json.loads(description)
    except json.JSONDecodeError:
        meta = {}
    if not isinstance(meta, dict) or meta.get("format") != RASTER_FORMAT:
        raise ParameterError(f"{src} is not a napari-gpfm map (no {RASTER_FORMAT} description)")
    return TileRaster(
        data=data,
        scale_yx=tuple(float(v) for v in meta["scale_yx"]),
        translate_yx=tuple(float(v) for v in meta["translate_yx"]),
        slide_dims=tuple(int(v) for v in meta["slide_dims"]),
        tile_size_l0=float(meta["tile_size_l0"]),
    )
