"""Region queries of a library: a slide's store + a region -> the most similar tiles of all slides.

One path for both faces: ``gpfm index search --store S --roi x,y,w,h`` and the Similar regions
panel's "Search in: a library" call :func:`search_roi`. The query store is checked here with
messages written for a query (the library's own checks speak of adding a store to it): it must
exist, be finished, and share the library's encoder, weights, tiling and pooling, because
vectors of another encoder or tiling live in an unrelated space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_gpfm.errors import ParameterError, StoreError

if TYPE_CHECKING:
    from napari_gpfm.library.index import LibraryHit, LibraryIndex


@dataclass(frozen=True)
class SearchOptions:
    """How many hits, and how they are grouped.

    ``per_slide=None``: the ``top_k`` best tiles of all slides, best first. ``per_slide=N``:
    group by slide, the best ``N`` tiles of each of the ``top_k`` best slides.
    ``include_query`` keeps the query region's own tiles (found when its slide is in the
    library) among the hits.
    """

    top_k: int = 50
    per_slide: int | None = None
    include_query: bool = False

    def __post_init__(self) -> None:
        for name in ("top_k", "per_slide"):
            value = getattr(self, name)
            if value is None and name == "per_slide":
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ParameterError(f"{name}={value!r} must be a whole number >= 1")

    @property
    def grouped(self) -> bool:
        return self.per_slide is not None


def _tiling_flags(tiling: dict[str, Any]) -> str:
    """``gpfm embed`` options that reproduce a recorded tiling (what the fix line suggests)."""
    flags = []
    for key, flag in (("mpp", "--mpp"), ("read_size", "--read-size"), ("model_size", "--size"),
                      ("stride", "--stride"), ("min_tissue", "--min-tissue")):
        if tiling.get(key) is not None:
            flags.append(f"{flag} {tiling[key]:g}" if isinstance(tiling[key], float)
                         else f"{flag} {tiling[key]}")
    return " ".join(flags)


def describe_tiling(tiling: dict[str, Any]) -> str:
    """A recorded tiling (``TilingSpec.to_dict()``) in words, e.g. ``64 px at 1.0 um/px, stride
    64 px, min. tissue 0.5``: every setting a user can change, so that two differ in words."""
    read = tiling.get("read_size", "?")
    model = tiling.get("model_size")
    resized = f" resized to {model} px" if model not in (None, read) else ""
    stride = tiling.get("stride") or read  # None: no overlap
    return (f"{read} px at {tiling.get('mpp', '?')} um/px{resized}, stride {stride} px, "
            f"min. tissue {tiling.get('min_tissue', '?')}")


def check_query_store(library: LibraryIndex, store: str | os.PathLike) -> Path:
    """The store at ``store``, checked as a query for ``library``; raises :class:`StoreError`
    naming the store and the fix when it is missing, unfinished or made with other settings.
    """
    from napari_gpfm.embedding.store import EmbeddingStore
    from napari_gpfm.library.sources import StoreSource, identity_differences

    path = Path(store).expanduser()
    if not path.exists():
        raise StoreError(f"query store {path} does not exist; embed the slide with `gpfm embed`")
    handle = EmbeddingStore.open(path)
    if not handle.is_complete:
        raise StoreError(
            f"the embedding {path} is not finished ({handle.n_done}/{handle.n_tiles} tiles): "
            "finish it (Embed panel, or `gpfm embed` again) before searching a library with it"
        )
    source = StoreSource.open(path)
    diffs = identity_differences(library.identity, source.identity)
    if diffs:
        meta = library.meta
        encoder = meta.get("encoder_name") or library.identity["encoder_id"]
        if source.identity["tiling_id"] != library.identity["tiling_id"]:
            # Tiling ids are hashes: say in words what each tiling is.
            diffs.append(f"tiles of {describe_tiling(source.attrs.get('tiling') or {})} "
                         f"instead of {describe_tiling(meta.get('tiling') or {})}")
        pooling = library.identity.get("pooling")
        pooling_flag = f" --pooling {pooling}" if pooling and pooling != "cls" else ""
        raise StoreError(
            f"the query store {path} does not fit library {library.path}: {'; '.join(diffs)}. "
            f"Embed this slide with the library's encoder and tiling (`gpfm embed SLIDE "
            f"--model {encoder} {_tiling_flags(meta.get('tiling') or {})}{pooling_flag}`, or "
            "the same choices in the Embed panel) and query with that store"
        )
    return source.path


def search_vector(library: LibraryIndex, vector: np.ndarray, options: SearchOptions,
                  exclude: np.ndarray | None = None) -> list[LibraryHit]:
    """The hits for one query vector ``(D,)``; ``exclude`` row ids are never returned."""
    return library.search(vector, top_k=options.top_k, group_by_slide=options.grouped,
                          per_slide=options.per_slide or 1,
                          exclude=None if options.include_query else exclude)


def search_roi(library: LibraryIndex, store: str | os.PathLike, roi: Any,
               options: SearchOptions) -> list[LibraryHit]:
    """The hits for the mean embedding of the tiles of ``store`` inside ``roi``.

    ``roi``: a :class:`~napari_gpfm.analysis.geometry.Roi`, a level-0 ``(x, y, w, h)``
    rectangle, an ``(x, y)`` point or an ``(M, 2)`` polygon. The region's own tiles are left
    out unless ``options.include_query``.
    """
    path = check_query_store(library, store)
    vector, own = library.query_from_store(path, roi)
    return search_vector(library, vector, options, exclude=own)
