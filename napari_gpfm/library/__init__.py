"""The library: tile embeddings of many slides in one faiss index ("find this across my slides").

``LibraryIndex.build(stores, out_dir)``, ``LibraryIndex.open(path)``, ``.add``, ``.remove``,
``.search``; ``choose_kind`` states when search stops being exact. Importing this package
imports neither faiss nor torch; the names below are resolved on first use.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

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

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
