"""Tiling: tissue masks, tile grids at a target resolution, and the fast tile loader.

Names are imported lazily so that ``import napari_gpfm.tiling`` stays cheap.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "TissueParams": "napari_gpfm.tiling.tissue",
    "TissueMask": "napari_gpfm.tiling.tissue",
    "detect_tissue": "napari_gpfm.tiling.tissue",
    "TilingSpec": "napari_gpfm.tiling.grid",
    "TileGrid": "napari_gpfm.tiling.grid",
    "make_grid": "napari_gpfm.tiling.grid",
    "TileLoader": "napari_gpfm.tiling.loader",
    "TileBatch": "napari_gpfm.tiling.loader",
    "render_preview": "napari_gpfm.tiling.preview",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
