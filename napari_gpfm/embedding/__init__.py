"""Embedding: run an encoder over a slide's tiles into a resumable zarr store; h5 interop.

``embed_slide`` / ``iter_embed`` (the engine), ``EmbeddingStore`` (the on-disk store),
``export_h5`` / ``read_h5`` / ``import_h5`` (TRIDENT/CLAM files). Importing this package
imports neither torch nor zarr; the names below are resolved on first use.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

_EXPORTS = {
    "EmbeddingStore": "store",
    "default_store_path": "store",
    "encoder_metadata": "store",
    "STORE_FORMAT": "store",
    "EmbedProgress": "engine",
    "EmbedResult": "engine",
    "embed_slide": "engine",
    "iter_embed": "engine",
    "prepare_store": "engine",
    "resolve_device": "engine",
    "export_h5": "h5io",
    "read_h5": "h5io",
    "import_h5": "h5io",
    "H5Features": "h5io",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
