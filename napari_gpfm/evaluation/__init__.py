"""Encoder evaluation on labelled tiles: GPFM's linear probe, kNN and retrieval protocols.

``load_tileset`` reads labelled tiles (image folder, CSV of boxes, or slide + GeoJSON regions);
``make_split`` holds whole regions (or bands) out; ``load_extractor`` wraps a registry encoder
or the ``baseline:colour-histogram``; the protocol functions return :class:`ProtocolResult`
(metrics with bootstrap intervals); ``evaluate`` runs them for several encoders into an
:class:`EvaluationReport` (Markdown / CSV). Submodules load on first use, so importing this
package imports neither torch nor the encoders.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "TileSet": "tilesets",
    "load_tileset": "tilesets",
    "tiles_from_imagefolder": "tilesets",
    "tiles_from_csv": "tilesets",
    "tiles_from_regions": "tilesets",
    "Split": "splits",
    "SPLIT_METHODS": "splits",
    "make_split": "splits",
    "grouped_split": "splits",
    "band_groups": "splits",
    "Estimate": "metrics",
    "classification_metrics": "metrics",
    "auroc_ovr_macro": "metrics",
    "bootstrap": "metrics",
    "COLOUR_HISTOGRAM": "features",
    "ColourHistogram": "features",
    "EncoderFeatures": "features",
    "FeatureExtractor": "features",
    "load_extractor": "features",
    "parse_model": "features",
    "AugmentParams": "augment",
    "augment_tiles": "augment",
    "PROTOCOLS": "protocols",
    "ProtocolResult": "protocols",
    "linear_probe": "protocols",
    "knn_probe": "protocols",
    "knn_probabilities": "protocols",
    "retrieval": "protocols",
    "retrieval_votes": "protocols",
    "zscore": "protocols",
    "augmentation_retrieval": "protocols",
    "EvaluationReport": "report",
    "ReportRow": "report",
    "EvalSettings": "runner",
    "evaluate": "runner",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
