"""A PNG to check a tiling by eye: thumbnail, tissue outlines, kept tiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_gpfm.tiling.grid import TileGrid
from napari_gpfm.tiling.tissue import TissueMask

TISSUE_COLOUR = (0, 200, 0)
TILE_COLOUR = (30, 80, 255)
# Below this many preview pixels per tile side, tiles are shown as a tint, not as outlines.
MIN_OUTLINED_PX = 6
TINT = 0.35


def render_preview(slide, grid: TileGrid, tissue_mask: TissueMask | None,
                   path: str | os.PathLike, max_size: int = 1600) -> Path:
    """Write a PNG of the slide's thumbnail with tissue contours (green) and kept tiles (blue).

    ``max_size`` bounds the longer side of the image in pixels. Kept tiles are outlined, or
    tinted blue when they would be under 6 preview pixels wide.
    """
    from PIL import Image, ImageDraw

    thumb = slide.thumbnail(max_size)
    width, height = slide.dimensions
    sx, sy = thumb.shape[1] / width, thumb.shape[0] / height
    side_x, side_y = grid.tile_size_l0 * sx, grid.tile_size_l0 * sy
    if min(side_x, side_y) >= MIN_OUTLINED_PX:
        image = Image.fromarray(np.ascontiguousarray(thumb)).convert("RGB")
        draw = ImageDraw.Draw(image)
        for x, y in grid.coords.tolist():
            x0, y0 = x * sx, y * sy
            draw.rectangle([x0, y0, x0 + side_x, y0 + side_y], outline=TILE_COLOUR, width=1)
    else:  # outlines of tiles this small would fill the picture: tint the kept area instead
        kept = Image.new("L", (thumb.shape[1], thumb.shape[0]), 0)
        fill = ImageDraw.Draw(kept)
        for x, y in grid.coords.tolist():
            fill.rectangle([x * sx, y * sy, x * sx + side_x, y * sy + side_y], fill=255)
        alpha = np.asarray(kept, dtype=np.float32)[..., None] / 255 * TINT
        tinted = thumb * (1 - alpha) + np.asarray(TILE_COLOUR, np.float32) * alpha
        image = Image.fromarray(tinted.round().astype(np.uint8))
        draw = ImageDraw.Draw(image)
    if tissue_mask is not None:
        for poly in tissue_mask.polygons():
            pts = [(float(px * sx), float(py * sy)) for px, py in poly]
            if len(pts) >= 2:
                draw.line(pts + [pts[0]], fill=TISSUE_COLOUR, width=2, joint="curve")
    from napari_gpfm.analysis._io import atomic_output

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "the preview") as tmp:
        image.save(tmp, format="PNG")
    return path
