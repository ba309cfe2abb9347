"""Store-level views: the maps, searches and predictions the CLI and the widgets both show.

Each function takes an open :class:`~napari_gpfm.embedding.store.EmbeddingStore` and returns
a :class:`StoreView`: per-tile values, the slide-aligned raster, and the provenance every
overlay records (slide, encoder, tiling). The CLI writes views to files; the napari widgets
turn the same views into layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_gpfm.analysis.geometry import Roi, tile_area_mm2
from napari_gpfm.analysis.maps import cluster_table, kmeans_clusters, pca_rgb
from napari_gpfm.analysis.rasters import TileRaster, tile_label_raster, tile_raster
from napari_gpfm.analysis.search import SearchResult, normalize, search_similar
from napari_gpfm.errors import ParameterError, StoreError


@dataclass
class StoreView:
    """Per-tile values of one slide, painted into a raster aligned with the slide."""

    kind: str
    values: np.ndarray  # (N,) scores, (N,) int labels, or (N, 3) colours in [0, 1]
    raster: TileRaster
    provenance: dict[str, Any]
    table: list[dict] = field(default_factory=list)
    search: SearchResult | None = None
    colours: np.ndarray | None = None  # (k, 3) uint8 for label views
    class_names: list[str] | None = None


def provenance(store) -> dict[str, Any]:
    """What made an overlay: recorded in layer metadata and file headers."""
    a = store.attrs
    return {
        "slide_path": a.get("slide_path"),
        "slide_fingerprint": a.get("slide_fingerprint"),
        "encoder_id": a.get("encoder_id"),
        "weights_sha256": a.get("weights_sha256"),
        "tiling_id": a.get("tiling_id"),
        "tiling": a.get("tiling"),
        "slide_mpp": a.get("slide_mpp"),
        "store": str(store.path),
    }


def _tiles(store):
    if store.n_tiles == 0:
        raise StoreError(
            f"{store.path} holds no tiles: its slide had no tissue tile at this tiling; embed it "
            "again with a lower --min-tissue or smaller tiles"
        )
    if store.n_done == 0:
        raise StoreError(
            f"{store.path} holds no embedded tiles yet; run `gpfm embed` (or the Embed widget) first"
        )
    return store.features, store.coords


def _geometry(store) -> tuple[float, float, tuple[int, int], float]:
    a = store.attrs
    tile = float(a["tile_size_l0"])
    stride = float(a.get("stride_l0") or tile)
    dims = tuple(int(v) for v in a["slide_dimensions"])
    return tile, stride, dims, float(a["slide_mpp"])  # type: ignore[return-value]


def tile_area(store) -> float:
    tile, stride, _, mpp = _geometry(store)
    return tile_area_mm2(tile, mpp, stride_l0=stride)


def pca_view(store) -> StoreView:
    feats, coords = _tiles(store)
    tile, stride, dims, _ = _geometry(store)
    if len(feats) < 3:
        raise ParameterError(f"{store.path}: a PCA map needs at least 3 tiles, found {len(feats)}")
    rgb = pca_rgb(feats)
    raster = tile_raster(coords, tile, rgb, dims, stride_l0=stride)
    return StoreView("pca", rgb, raster, provenance(store))


def cluster_view(store, k: int, seed: int = 0) -> StoreView:
    feats, coords = _tiles(store)
    tile, stride, dims, _ = _geometry(store)
    res = kmeans_clusters(feats, k, seed=seed)
    raster = tile_label_raster(coords, tile, res.labels, k, dims, stride_l0=stride)
    table = cluster_table(res.labels, k, tile_area(store), colours=res.colours)
    return StoreView("clusters", res.labels, raster, provenance(store), table=table,
                     colours=res.colours)


def similarity_view(store, roi: Roi, k: int = 20, exclude_query: bool = True) -> StoreView:
    feats, coords = _tiles(store)
    tile, stride, dims, _ = _geometry(store)
    normed = normalize(feats)
    result = search_similar(normed, coords, tile, roi, k=k, exclude_query=exclude_query)
    query = normed[result.query_indices].mean(axis=0)
    query /= max(float(np.linalg.norm(query)), 1e-12)
    scores = normed @ query
    raster = tile_raster(coords, tile, scores, dims, stride_l0=stride)
    return StoreView("similarity", scores, raster, provenance(store), table=result.rows(),
                     search=result)


def probe_view(store, probe) -> StoreView:
    """Predict every tile with a fitted LinearProbe: class labels, probabilities, areas."""
    from napari_gpfm.analysis.classify import area_table

    feats, coords = _tiles(store)
    tile, stride, dims, _ = _geometry(store)
    proba = probe.predict_proba(feats)
    pred = proba.argmax(axis=1)
    raster = tile_label_raster(coords, tile, pred, probe.n_classes, dims, stride_l0=stride)
    table = area_table(pred, probe.class_names, tile_area(store), colours=probe.colours)
    view = StoreView("classes", pred, raster, provenance(store), table=table,
                     colours=np.asarray(probe.colours, dtype=np.uint8),
                     class_names=list(probe.class_names))
    view.probabilities = proba  # type: ignore[attr-defined]
    return view


def check_store_matches_slide(store, slide_fingerprint: str) -> None:
    """Refuse to overlay a store made from another slide's content."""
    made_for = store.attrs.get("slide_fingerprint")
    if made_for != slide_fingerprint:
        raise StoreError(
            f"{store.path} was made from another slide ({store.attrs.get('slide_name')}); "
            "embed this slide, or open the slide the store belongs to"
        )
