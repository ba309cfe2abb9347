"""Qt-free analysis of tile features: maps, similarity search, linear probes, GeoJSON.

Everything works on plain arrays: ``features (N, D)`` (one row per tile), ``coords (N, 2)``
(level-0 top-left ``x, y`` of each tile), ``tile_size_l0`` and the slide's level-0
``(width, height)``. The CLI, the napari widgets and the library index share these functions.
Submodules are imported on first use so that importing this package stays cheap.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "Roi": "geometry",
    "tile_area_mm2": "geometry",
    "tile_boxes": "geometry",
    "tile_centres": "geometry",
    "tiles_in_roi": "geometry",
    "TileRaster": "rasters",
    "tile_raster": "rasters",
    "tile_label_raster": "rasters",
    "raster_to_rgba": "rasters",
    "write_map_png": "rasters",
    "write_map_tiff": "rasters",
    "read_map_tiff": "rasters",
    "ClusterResult": "maps",
    "PcaColours": "maps",
    "cluster_table": "maps",
    "fit_pca_colours": "maps",
    "kmeans_clusters": "maps",
    "pca_rgb": "maps",
    "SearchResult": "search",
    "normalize": "search",
    "query_vector": "search",
    "search_similar": "search",
    "similarity": "search",
    "top_k": "search",
    "CrossValidation": "classify",
    "LinearProbe": "classify",
    "area_table": "classify",
    "labels_from_rois": "classify",
    "Annotation": "geojson",
    "read_geojson": "geojson",
    "shapes_to_geojson": "geojson",
    "tiles_to_geojson": "geojson",
    "write_geojson": "geojson",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
