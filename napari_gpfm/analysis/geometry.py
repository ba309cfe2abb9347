"""Tile geometry and regions of interest, in level-0 pixels ``(x, y)``.

A tile is the square ``[x, x + tile_size_l0) x [y, y + tile_size_l0)`` whose top-left is its
row in ``coords``. A tile belongs to a rectangle or polygon when its *centre* lies inside, so
every tile is assigned to at most one side of a boundary and a region never "half" holds a tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from napari_gpfm.errors import ParameterError

RoiKind = Literal["rectangle", "polygon", "point"]

# Points x polygon-edges evaluated per block in the ray-casting test (bounds memory use).
_PIP_BLOCK_ELEMENTS = 1 << 21


def as_coords(coords: np.ndarray | Sequence) -> np.ndarray:
    """Return tile coordinates as an ``(N, 2)`` float64 array, checking the shape."""
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ParameterError(
            f"tile coords must have shape (N, 2) (level-0 x, y per tile), got {arr.shape}"
        )
    return arr


def check_tile_size(tile_size_l0: float) -> float:
    """Return ``tile_size_l0`` as a positive float or raise ParameterError."""
    size = float(tile_size_l0)
    if not np.isfinite(size) or size <= 0:
        raise ParameterError(f"tile_size_l0={tile_size_l0!r} must be a positive number of pixels")
    return size


def tile_centres(coords: np.ndarray, tile_size_l0: float) -> np.ndarray:
    """Return the level-0 ``(x, y)`` centre of each tile, ``(N, 2)`` float64."""
    return as_coords(coords) + check_tile_size(tile_size_l0) / 2.0


def tile_boxes(coords: np.ndarray, tile_size_l0: float) -> np.ndarray:
    """Return each tile as a level-0 box ``(x, y, w, h)``, ``(N, 4)`` float64."""
    xy = as_coords(coords)
    size = check_tile_size(tile_size_l0)
    return np.column_stack([xy, np.full((len(xy), 2), size)])


def tile_area_mm2(tile_size_l0: float, mpp: float, stride_l0: float | None = None) -> float:
    """Area in mm^2 that one tile stands for.

    With overlapping tiles (``stride_l0 < tile_size_l0``) each tile stands for one stride cell,
    otherwise summed areas would count the overlaps several times.
    """
    size = check_tile_size(tile_size_l0)
    step = size if stride_l0 is None else min(size, check_tile_size(stride_l0))
    if not np.isfinite(mpp) or mpp <= 0:
        raise ParameterError(f"mpp={mpp!r} must be a positive number of micrometres per pixel")
    side_mm = step * float(mpp) / 1000.0
    return side_mm * side_mm


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd ray casting: which ``(P, 2)`` points lie inside the ``(M, 2)`` polygon.

    Works for concave and self-intersecting rings; the ring may be open or closed. A ray is
    cast towards +x from each point and the edges it crosses are counted. Points exactly on an
    edge may fall either side.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=np.float64)
    inside = np.zeros(len(pts), dtype=bool)
    if len(pts) == 0 or len(poly) < 3:
        return inside
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    straddles_dy = y2 - y1
    # Horizontal edges never straddle a ray; give them a harmless slope to avoid 0/0 warnings.
    safe_dy = np.where(straddles_dy == 0, 1.0, straddles_dy)
    inv_slope = (x2 - x1) / safe_dy

    lo, hi = poly.min(axis=0), poly.max(axis=0)
    candidates = np.flatnonzero(
        (pts[:, 0] >= lo[0]) & (pts[:, 0] <= hi[0]) & (pts[:, 1] >= lo[1]) & (pts[:, 1] <= hi[1])
    )
    block = max(1, _PIP_BLOCK_ELEMENTS // len(poly))
    for start in range(0, len(candidates), block):
        idx = candidates[start : start + block]
        px = pts[idx, 0:1]
        py = pts[idx, 1:2]
        straddles = (y1 > py) != (y2 > py)
        x_cross = x1 + (py - y1) * inv_slope
        crossings = np.count_nonzero(straddles & (px < x_cross), axis=1)
        inside[idx] = (crossings % 2) == 1
    return inside


def boxes_touching_polygon(boxes: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Which ``(N, 4)`` boxes ``(x0, y0, x1, y1)`` share any area with the ``(M, 2)`` polygon.

    A box touches a polygon when one of the polygon's edges crosses it (an edge that ends
    inside the box counts) or when the box lies wholly inside (its centre is inside and no edge
    crosses). Edges are clipped against each box with Liang-Barsky, all at once.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    poly = np.asarray(polygon, dtype=np.float64)
    if len(b) == 0 or len(poly) < 3:
        return np.zeros(len(b), dtype=bool)
    centres = (b[:, :2] + b[:, 2:]) / 2
    touching = points_in_polygon(centres, poly)
    start, end = poly, np.roll(poly, -1, axis=0)
    d = end - start
    t0 = np.zeros((len(b), len(poly)))
    t1 = np.ones((len(b), len(poly)))
    crossing = np.ones((len(b), len(poly)), dtype=bool)
    for axis in (0, 1):
        for p, q in ((-d[:, axis], start[:, axis] - b[:, axis:axis + 1]),
                     (d[:, axis], b[:, axis + 2:axis + 3] - start[:, axis])):
            p = np.broadcast_to(p, q.shape)
            parallel = p == 0
            crossing &= ~(parallel & (q < 0))
            with np.errstate(divide="ignore", invalid="ignore"):
                t = q / np.where(parallel, 1.0, p)
            t0 = np.where(~parallel & (p < 0), np.maximum(t0, t), t0)
            t1 = np.where(~parallel & (p > 0), np.minimum(t1, t), t1)
    crossing &= t0 <= t1
    return touching | crossing.any(axis=1)


@dataclass(frozen=True, eq=False)
class Roi:
    """A region of interest in level-0 pixels.

    Build one with :meth:`rectangle`, :meth:`polygon` or :meth:`point` (or :meth:`coerce`).
    ``vertices`` holds the 4 corners of a rectangle, the ``(M, 2)`` ring of a polygon, or the
    single ``(1, 2)`` location of a point, all as ``(x, y)``.
    """

    kind: RoiKind
    vertices: np.ndarray

    @classmethod
    def rectangle(cls, x: float, y: float, w: float, h: float) -> Roi:
        """An axis-aligned rectangle with top-left ``(x, y)`` and size ``(w, h)``."""
        x, y, w, h = (float(v) for v in (x, y, w, h))
        if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            raise ParameterError(
                f"rectangle ROI (x={x}, y={y}, w={w}, h={h}) needs finite values and w, h > 0"
            )
        corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)
        return cls("rectangle", corners)

    @classmethod
    def polygon(cls, vertices: np.ndarray | Sequence) -> Roi:
        """A polygon from ``(M, 2)`` level-0 ``(x, y)`` vertices (open or closed ring)."""
        ring = np.asarray(vertices, dtype=np.float64)
        if ring.ndim != 2 or ring.shape[1] != 2:
            raise ParameterError(
                f"polygon ROI vertices must have shape (M, 2) as level-0 (x, y), got {ring.shape}"
            )
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if not np.all(np.isfinite(ring)):
            raise ParameterError("polygon ROI vertices must be finite numbers")
        distinct = len(np.unique(ring, axis=0))
        # Collinear vertices span no area (a bow-tie's signed area is 0 yet it covers some).
        if distinct < 3 or np.linalg.matrix_rank(ring - ring.mean(axis=0)) < 2:
            shape = "it is a single point" if distinct == 1 else (
                f"its {distinct} distinct vertices lie on a line")
            raise ParameterError(
                f"the region has no area ({shape}): draw it by dragging over the slide"
            )
        return cls("polygon", ring)

    @classmethod
    def point(cls, x: float, y: float) -> Roi:
        """A single level-0 location; it selects the tile whose centre is nearest."""
        xy = np.array([[float(x), float(y)]], dtype=np.float64)
        if not np.all(np.isfinite(xy)):
            raise ParameterError(f"point ROI ({x}, {y}) must be finite numbers")
        return cls("point", xy)

    @classmethod
    def coerce(cls, roi: Roi | Sequence | np.ndarray) -> Roi:
        """Accept a Roi, ``(x, y)`` point, ``(x, y, w, h)`` rectangle or ``(M, 2)`` polygon."""
        if isinstance(roi, Roi):
            return roi
        arr = np.asarray(roi, dtype=np.float64)
        if arr.shape == (2,):
            return cls.point(*arr)
        if arr.shape == (4,):
            return cls.rectangle(*arr)
        if arr.ndim == 2 and arr.shape[1] == 2:
            return cls.polygon(arr)
        raise ParameterError(
            f"cannot read an ROI of shape {arr.shape}: give (x, y), (x, y, w, h) or (M, 2) vertices"
        )

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x, y, w, h)`` (zero size for a point)."""
        lo = self.vertices.min(axis=0)
        hi = self.vertices.max(axis=0)
        return (float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1]))

    @property
    def area(self) -> float:
        """Area in level-0 pixels squared (shoelace formula; 0 for a point)."""
        if self.kind == "point":
            return 0.0
        x, y = self.vertices[:, 0], self.vertices[:, 1]
        return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of the ``(P, 2)`` points inside the region (always False for a point).

        Rectangles are half-open, ``x <= px < x + w``, like pixel ranges, so two rectangles
        that share an edge never both contain a point.
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.kind == "point":
            return np.zeros(len(pts), dtype=bool)
        if self.kind == "rectangle":
            x, y, w, h = self.bounds
            return (pts[:, 0] >= x) & (pts[:, 0] < x + w) & (pts[:, 1] >= y) & (pts[:, 1] < y + h)
        return points_in_polygon(pts, self.vertices)


def tiles_in_roi(
    coords: np.ndarray,
    tile_size_l0: float,
    roi: Roi | Sequence | np.ndarray,
    max_point_distance_l0: float | None = None,
) -> np.ndarray:
    """Indices (ascending, int64) of the tiles selected by ``roi``.

    Rectangles and polygons select the tiles whose centre lies inside. A point selects the one
    tile whose centre is nearest, provided it is within ``max_point_distance_l0`` (default: one
    tile side), so a click on background far from any tissue tile selects nothing rather than a
    tile elsewhere on the slide; pass ``float('inf')`` to always take the nearest tile.
    """
    region = Roi.coerce(roi)
    centres = tile_centres(coords, tile_size_l0)
    if region.kind != "point":
        return np.flatnonzero(region.contains(centres)).astype(np.int64)
    if len(centres) == 0:
        return np.zeros(0, dtype=np.int64)
    limit = float(tile_size_l0) if max_point_distance_l0 is None else float(max_point_distance_l0)
    d2 = np.sum((centres - region.vertices[0]) ** 2, axis=1)
    nearest = int(np.argmin(d2))
    if d2[nearest] > limit * limit:
        return np.zeros(0, dtype=np.int64)
    return np.array([nearest], dtype=np.int64)
