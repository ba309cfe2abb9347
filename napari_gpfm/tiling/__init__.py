"""Tiling: tissue masks, tile grids at a target resolution, and the fast tile loader.

Names are imported lazily so that ``import napari_gpfm.tiling`` stays cheap.
"""

from __future__ import annotations

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

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_gpfm.tiling' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
