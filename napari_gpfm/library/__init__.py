"""The library: tile embeddings of many slides in one faiss index ("find this across my slides").

``LibraryIndex.build(stores, out_dir)``, ``LibraryIndex.open(path)``, ``.add``, ``.remove``,
``.search``; ``choose_kind`` states when search stops being exact. Importing this package
imports neither faiss nor torch; the names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LibraryIndex": "index",
    "LibraryHit": "index",
    "EngineConfig": "engine",
    "VectorEngine": "engine",
    "choose_kind": "engine",
    "exact_top_k": "engine",
    "recall_at_k": "engine",
    "KINDS": "engine",
    "find_stores": "sources",
    "ClusteredEmbeddings": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_gpfm.library' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"napari_gpfm.library.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
