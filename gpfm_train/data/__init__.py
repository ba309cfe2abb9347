"""Pretraining data: corpus manifests, tile datasets, multi-crop augmentation, masks, sampler.

* :mod:`~gpfm_train.data.manifests` -- sources YAML, slide/tile manifest CSVs, manifest building.
* :mod:`~gpfm_train.data.datasets` -- ``SlideTileDataset``, ``TileFolderDataset``,
  ``MultiCropDataset``.
* :mod:`~gpfm_train.data.augment` -- the DINOv2 multi-crop augmentation (seeded per sample).
* :mod:`~gpfm_train.data.collate` -- multi-crop batches with iBOT masks.
* :mod:`~gpfm_train.data.sampler` -- the infinite, rank-sharded, resumable sampler.

Names are imported lazily so that ``import gpfm_train.data`` stays cheap (no torch).
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "SourceRecord": "gpfm_train.data.manifests",
    "SourcesFile": "gpfm_train.data.manifests",
    "SlideRow": "gpfm_train.data.manifests",
    "TileRow": "gpfm_train.data.manifests",
    "SlideManifestBuild": "gpfm_train.data.manifests",
    "load_sources": "gpfm_train.data.manifests",
    "load_slide_manifest": "gpfm_train.data.manifests",
    "load_tile_manifest": "gpfm_train.data.manifests",
    "write_manifest": "gpfm_train.data.manifests",
    "build_slide_manifest": "gpfm_train.data.manifests",
    "validate_manifest_file": "gpfm_train.data.manifests",
    "SlideTileDataset": "gpfm_train.data.datasets",
    "TileFolderDataset": "gpfm_train.data.datasets",
    "MultiCropDataset": "gpfm_train.data.datasets",
    "MultiCropConfig": "gpfm_train.data.augment",
    "MultiCropAugmentation": "gpfm_train.data.augment",
    "sample_seed": "gpfm_train.data.augment",
    "MaskConfig": "gpfm_train.data.collate",
    "MultiCropCollator": "gpfm_train.data.collate",
    "collate_multicrop": "gpfm_train.data.collate",
    "InfiniteShardedSampler": "gpfm_train.data.sampler",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
