"""Embedding: run an encoder over a slide's tiles into a resumable zarr store; h5 interop.

``embed_slide`` / ``iter_embed`` (the engine), ``EmbeddingStore`` (the on-disk store),
``export_h5`` / ``read_h5`` / ``import_h5`` (TRIDENT/CLAM files). Importing this package
imports neither torch nor zarr; the names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

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

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_gpfm.embedding' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"napari_gpfm.embedding.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
