"""Tissue detection on a low-resolution overview: saturation threshold + morphology.

H&E tissue is coloured (pink eosin, purple haematoxylin) while glass is near-white and grey
whatever the scanner's white balance, so the HSV saturation of an area-averaged overview at
about 8 um/px separates the two. Otsu picks the threshold per slide; it is clipped to a sane
band so that a slide that is all glass (Otsu would split JPEG noise) finds nothing, and a slide
that is all tissue (Otsu would split pale from dark tissue) keeps its pale stroma. Brightness
guards drop black scanner borders (their saturation is noise) and white glass.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from napari_gpfm.errors import ParameterError

# Otsu on saturation is clipped to this band (saturation is 0..1). Below 0.05 is JPEG noise
# on glass; above 0.15 the threshold would start cutting pale pink stroma and loose collagen
# (measured on CMU-1-Small-Region: glass 0.00-0.04, pale dermis 0.06-0.2, Otsu 0.19).
OTSU_MIN = 0.05
OTSU_MAX = 0.15


@dataclass(frozen=True)
class TissueParams:
    """How tissue is told from glass. Lengths in microns, areas in square microns.

    ``saturation_threshold=None`` chooses it per slide (Otsu, clipped to 0.05-0.15);
    ``min_value``/``max_value`` bound the mean RGB brightness (0-255) of tissue pixels;
    enclosed holes up to ``max_hole_um2`` are filled when ``fill_holes`` (None = any size);
    larger ones (lumens, tears) stay out so that tiles of bare glass are not kept.
    ``opening_um`` is off by default: at 8 um/px an opening erases real tissue strands a few
    pixels thick (it did on the sample's dermal strand); ``min_area_um2`` drops the specks.
    """

    mask_mpp: float = 8.0
    saturation_threshold: float | None = None
    min_value: float = 20.0
    max_value: float = 240.0
    closing_um: float = 32.0
    opening_um: float = 0.0
    fill_holes: bool = True
    max_hole_um2: float | None = 100_000.0
    min_area_um2: float = 20_000.0

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ParameterError(f"tissue {name}={getattr(self, name)!r} must be {what}")

        def finite(v) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        check("mask_mpp", finite(self.mask_mpp) and 0.1 <= self.mask_mpp <= 1000,
              "a pixel size in um/px between 0.1 and 1000")
        t = self.saturation_threshold
        check("saturation_threshold", t is None or (finite(t) and 0 <= t < 1),
              "None (automatic) or a saturation between 0 and 1")
        check("min_value", finite(self.min_value) and 0 <= self.min_value <= 255, "in 0..255")
        check("max_value", finite(self.max_value) and self.min_value < self.max_value <= 255,
              "in 0..255 and above min_value")
        for name in ("closing_um", "opening_um", "min_area_um2"):
            check(name, finite(getattr(self, name)) and getattr(self, name) >= 0, "0 or more")
        check("fill_holes", isinstance(self.fill_holes, bool), "True or False")
        h = self.max_hole_um2
        check("max_hole_um2", h is None or (finite(h) and h >= 0), "None (any size) or 0 or more")

    def to_dict(self) -> dict:
        """Plain JSON-able values (floats as floats, so that equal params hash equal)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                d[k] = float(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TissueParams:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ParameterError(f"unknown tissue parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)


class TissueMask:
    """A boolean tissue mask over a whole slide at low resolution.

    Mask pixel ``[i, j]`` covers level-0 ``x in [j * dx, (j + 1) * dx)``, ``y in [i * dy, ...)``
    where ``(dx, dy) = downsample``. Boxes and polygons are in level-0 pixels.
    """

    def __init__(self, mask: np.ndarray, downsample: tuple[float, float],
                 slide_dims: tuple[int, int], mpp_xy: tuple[float, float],
                 threshold: float | None = None, params: TissueParams | None = None):
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = (float(downsample[0]), float(downsample[1]))
        self.slide_dims = (int(slide_dims[0]), int(slide_dims[1]))
        self.mpp_xy = (float(mpp_xy[0]), float(mpp_xy[1]))
        self.threshold = threshold
        self.params = params
        h, w = self.mask.shape
        # Integral image with a zero first row/column: sums over any mask-pixel rectangle.
        self._integral = np.zeros((h + 1, w + 1), dtype=np.float64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1,
                  out=self._integral[1:, 1:])

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def area_mm2(self) -> float:
        """Tissue area in mm2, with the mask's edge pixels clipped to the slide."""
        w, h = self.slide_dims
        dx, dy = self.downsample
        mh, mw = self.mask.shape
        col_w = np.clip(w - np.arange(mw) * dx, 0, dx)
        row_h = np.clip(h - np.arange(mh) * dy, 0, dy)
        px = float(row_h @ self.mask.astype(np.float64) @ col_w)
        return px * self.mpp_xy[0] * self.mpp_xy[1] / 1e6

    @property
    def fraction(self) -> float:
        """Share of the slide's area that is tissue."""
        w, h = self.slide_dims
        return self.area_mm2 * 1e6 / (w * h * self.mpp_xy[0] * self.mpp_xy[1])

    def _cumulative(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px) in [0, u) x [0, v) for real u, v: bilinear in the integral."""
        s = self._integral
        h, w = self.mask.shape
        u = np.clip(u, 0, w)
        v = np.clip(v, 0, h)
        j = np.minimum(np.floor(u).astype(np.int64), w - 1)
        i = np.minimum(np.floor(v).astype(np.int64), h - 1)
        fu, fv = u - j, v - i
        top = s[i, j] * (1 - fu) + s[i, j + 1] * fu
        bottom = s[i + 1, j] * (1 - fu) + s[i + 1, j + 1] * fu
        return top * (1 - fv) + bottom * fv

    def fractions(self, x, y, w, h) -> np.ndarray:
        """Tissue fraction of many level-0 boxes (arrays or scalars, broadcast together).

        Exact area weighting: a box covering a third of a tissue pixel counts a third of it.
        Area outside the mask (beyond the slide) counts as no tissue.
        """
        x, y, w, h = (np.asarray(a, dtype=np.float64) for a in (x, y, w, h))
        dx, dy = self.downsample
        u0, u1 = x / dx, (x + w) / dx
        v0, v1 = y / dy, (y + h) / dy
        c = self._cumulative
        inside = c(u1, v1) - c(u0, v1) - c(u1, v0) + c(u0, v0)
        area = (u1 - u0) * (v1 - v0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(area > 0, inside / np.where(area > 0, area, 1), 0.0)
        return np.clip(out, 0.0, 1.0)

    def fraction_in(self, x: float, y: float, w: float, h: float) -> float:
        """Tissue fraction (0-1) of one level-0 box."""
        return float(self.fractions(x, y, w, h))

    def polygons(self, simplify_um: float = 0.0) -> list[np.ndarray]:
        """Outer contour of each tissue region as an ``(M, 2)`` float array of level-0 (x, y).

        Each polygon is closed (last vertex = first). ``simplify_um`` > 0 drops vertices within
        that distance of the simplified outline (Douglas-Peucker).
        """
        from scipy import ndimage
        from skimage.measure import approximate_polygon, find_contours

        labels, _ = ndimage.label(self.mask, structure=np.ones((3, 3), bool))
        dx, dy = self.downsample
        tol = simplify_um / ((self.mpp_xy[0] + self.mpp_xy[1]) / 2)
        w, h = self.slide_dims
        out = []
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            region = ndimage.binary_fill_holes(labels[sl] == k)
            padded = np.pad(region, 1).astype(np.float32)
            contours = find_contours(padded, 0.5, fully_connected="high")
            if not contours:
                continue
            rc = max(contours, key=len)
            # Contour (row, col) are in padded-mask pixel-centre units: centre of pixel j is
            # level-0 x = (j + 0.5) * dx.
            xs = (rc[:, 1] - 1 + sl[1].start + 0.5) * dx
            ys = (rc[:, 0] - 1 + sl[0].start + 0.5) * dy
            poly = np.stack([np.clip(xs, 0, w), np.clip(ys, 0, h)], axis=1)
            if tol > 0 and len(poly) > 4:
                poly = approximate_polygon(poly, tolerance=tol)
            out.append(poly.astype(np.float64))
        return out

    def __repr__(self) -> str:
        return (f"TissueMask({self.mask.shape[1]}x{self.mask.shape[0]} @ "
                f"{self.downsample[0]:.2f} px/px, {self.area_mm2:.2f} mm2)")


# ---------------------------------------------------------------------- overview
def read_overview(slide, mpp: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Area-averaged RGB overview at about ``mpp`` um/px, as float32 ``(h, w, 3)``.

    Reads the coarsest level still at least as sharp, one native tile at a time, and averages
    blocks of ``f x f`` level pixels: memory is the overview's, whatever the slide size.
    Returns the overview and its level-0 downsample ``(dx, dy)``.
    """
    from napari_gpfm.tiling.native import NativeTileReader

    target = mpp / slide.mpp
    level = slide.best_level_for_downsample(max(target, 1.0))
    factor = max(1, int(round(target / slide.level_downsamples[level])))
    with NativeTileReader(slide, level) as reader:
        grid = reader.grid
        H, W = grid.height, grid.width
        oh, ow = math.ceil(H / factor), math.ceil(W / factor)
        # float32 adds whole numbers exactly below 2**24: enough for blocks up to 256 x 256 px.
        exact32 = factor * factor * 255 < 2**24
        sums = np.zeros((oh, ow, 3), dtype=np.float32 if exact32 else np.float64)

        def band(row: int) -> tuple[int, np.ndarray]:
            # Sums of the overview rows this band of native tiles touches, tile by tile: a
            # block straddling two tiles gets its two parts added, so no band is ever joined.
            y0, y1, _, _ = grid.bounds(row, 0)
            r0, r1 = y0 // factor, (y1 - 1) // factor
            row_starts = np.maximum(np.arange(r0, r1 + 1) * factor - y0, 0)
            part = np.zeros((r1 - r0 + 1, ow, 3), dtype=np.float64)
            for col in range(grid.cols):
                _, _, x0, x1 = grid.bounds(row, col)
                q0, q1 = x0 // factor, (x1 - 1) // factor
                col_starts = np.maximum(np.arange(q0, q1 + 1) * factor - x0, 0)
                tile = reader.decode(row, col)
                rows = np.add.reduceat(tile, row_starts, axis=0, dtype=np.float64)
                part[:, q0 : q1 + 1] += np.add.reduceat(rows, col_starts, axis=1)
            return r0, part

        workers = min(os.cpu_count() or 1, 4)
        with ThreadPoolExecutor(workers, thread_name_prefix="gpfm-tissue") as pool:
            for r0, part in pool.map(band, range(grid.rows)):
                sums[r0 : r0 + part.shape[0]] += part
    rows_n = np.minimum(H - np.arange(oh) * factor, factor).astype(sums.dtype)
    cols_n = np.minimum(W - np.arange(ow) * factor, factor).astype(sums.dtype)
    sums /= rows_n[:, None, None]  # in place: the overview is the largest array here
    sums /= cols_n[None, :, None]
    l0w, l0h = slide.dimensions
    downsample = (factor * l0w / W, factor * l0h / H)
    return sums.astype(np.float32, copy=False), downsample


def _histogram(values: np.ndarray, keep: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram over [0, 1] of ``values[keep]``, a block of rows at a time (bounded memory)."""
    hist = np.zeros(bins, dtype=np.int64)
    step = max(1, (1 << 20) // max(values.shape[1], 1))
    for y in range(0, values.shape[0], step):
        block = values[y : y + step][keep[y : y + step]]
        hist += np.histogram(block, bins=bins, range=(0.0, 1.0))[0]
    return hist


def _otsu(hist: np.ndarray) -> float:
    """Otsu's threshold for a histogram over [0, 1] (maximises the between-class variance)."""
    hist = hist.astype(np.float64)
    edges = np.linspace(0.0, 1.0, len(hist) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    total = m0[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (w0 * w1) * (m0 / w0 - (total - m0) / w1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1]) if between.size else 0.5


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + radius  # rounder small disks


def segment_tissue(rgb: np.ndarray, params: TissueParams, px_um: float) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB overview whose pixels are ``px_um`` microns; returns (mask, threshold)."""
    from scipy import ndimage

    rgb = rgb.astype(np.float32, copy=False)
    hi = rgb.max(axis=2)
    saturation = hi - rgb.min(axis=2)
    saturation /= np.maximum(hi, 1.0, out=hi)
    del hi
    brightness = rgb.mean(axis=2)
    valid = (brightness >= params.min_value) & (brightness <= params.max_value)
    if params.saturation_threshold is not None:
        threshold = float(params.saturation_threshold)
    else:
        hist = _histogram(saturation, brightness >= params.min_value)
        raw = _otsu(hist) if hist.sum() else OTSU_MAX
        threshold = float(np.clip(raw, OTSU_MIN, OTSU_MAX))
    mask = valid & (saturation > threshold)

    px_area = px_um * px_um
    closing = int(round(params.closing_um / px_um))
    opening = int(round(params.opening_um / px_um))
    if closing > 0:
        # Pad so that tissue touching the slide edge is not eaten by the closing's erosion.
        pad = closing + 1
        mask = ndimage.binary_closing(np.pad(mask, pad), structure=_disk(closing))[pad:-pad, pad:-pad]
    if params.fill_holes:
        filled = ndimage.binary_fill_holes(mask)
        holes = filled & ~mask
        if params.max_hole_um2 is not None and holes.any():
            labels, _ = ndimage.label(holes)
            small = np.bincount(labels.ravel()) * px_area <= params.max_hole_um2
            small[0] = False  # label 0 is everything that is not a hole
            mask = mask | small[labels]
        else:
            mask = filled
    if opening > 0:
        mask = ndimage.binary_opening(mask, structure=_disk(opening))
    if params.min_area_um2 > 0 and mask.any():
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
        keep = np.bincount(labels.ravel()) * px_area >= params.min_area_um2
        keep[0] = False  # background
        mask = keep[labels]
    return mask, threshold


def detect_tissue(slide, params: TissueParams | None = None) -> TissueMask:
    """Find the tissue on a slide; works on an overview at ``params.mask_mpp`` um/px.

    Raises the slide's :class:`~napari_gpfm.errors.SlideError` when it has no pixel size
    (morphology and areas are in microns): open it with ``mpp=``.
    """
    params = params or TissueParams()
    mpp_xy = slide.mpp_xy
    rgb, downsample = read_overview(slide, params.mask_mpp)
    px_um = (downsample[0] * mpp_xy[0] + downsample[1] * mpp_xy[1]) / 2
    mask, threshold = segment_tissue(rgb, params, px_um)
    return TissueMask(mask, downsample, slide.dimensions, mpp_xy, threshold=threshold,
                      params=params)
