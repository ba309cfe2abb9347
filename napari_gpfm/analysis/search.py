"""Similarity search inside one slide: "show me tiles that look like this region".

Features are L2-normalised once (:func:`normalize`); a query is then one float32
matrix-vector product plus a partial sort, which for 50k tiles x 1024 dims takes tens of
milliseconds on one CPU core (see ``bench/bench_search_inslide.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_gpfm.analysis.geometry import Roi, tile_boxes, tiles_in_roi
from napari_gpfm.errors import ParameterError

__all__ = [
    "Roi",
    "SearchResult",
    "normalize",
    "query_vector",
    "search_similar",
    "similarity",
    "tiles_in_roi",
    "top_k",
]

EMPTY_ROI_MESSAGE = (
    "the ROI contains no embedded tile; draw it over tissue (tiles under the minimum tissue "
    "fraction of the embedding were left out)"
)


def _as_features(features: np.ndarray) -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ParameterError(f"features must have shape (N, D) (one row per tile), got {arr.shape}")
    return arr


def normalize(features: np.ndarray) -> np.ndarray:
    """Return float32 rows scaled to unit L2 norm (a new array; all-zero rows stay zero)."""
    arr = _as_features(features).astype(np.float32, copy=True)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)):
        bad = int(np.flatnonzero(~np.isfinite(norms[:, 0]))[0])
        raise ParameterError(
            f"features of tile {bad} contain NaN or infinity; re-run the embedding for this slide"
        )
    np.divide(arr, np.where(norms > 0, norms, 1.0), out=arr)
    return arr


def query_vector(features: np.ndarray, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """Mean of the normalised features of the selected tiles, renormalised (float32, (D,)).

    Each tile is normalised before averaging so that every selected tile weighs the same.
    """
    arr = _as_features(features)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ParameterError(EMPTY_ROI_MESSAGE)
    if idx.min() < 0 or idx.max() >= len(arr):
        raise ParameterError(
            f"tile indices must be in [0, {len(arr)}), got {int(idx.min())}..{int(idx.max())}"
        )
    mean = normalize(arr[idx]).astype(np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm == 0.0:
        raise ParameterError(
            "the selected tiles' features average to zero; select a smaller, more uniform region"
        )
    return (mean / norm).astype(np.float32)


def similarity(features_normed: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(N,)`` float32 of every (pre-normalised) tile to a unit query."""
    feats = _as_features(features_normed)
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if q.shape[0] != feats.shape[1]:
        raise ParameterError(
            f"query has {q.shape[0]} dims but the features have {feats.shape[1]}; "
            "use features from the same encoder"
        )
    if feats.dtype != np.float32:
        feats = feats.astype(np.float32)
    return feats @ q


def top_k(
    scores: np.ndarray, k: int, exclude: np.ndarray | Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest scores, best first: ``(indices int64, scores)``.

    ``exclude`` lists indices never returned (e.g. the query tiles themselves). NaN scores are
    never returned. Fewer than ``k`` results come back when fewer are available. Ties are
    broken by the lower index so results are reproducible.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ParameterError(f"k={k!r} must be a whole number >= 1 (how many tiles to return)")
    k = int(k)
    values = np.asarray(scores).reshape(-1)
    work = values.astype(np.float64)
    work[np.isnan(work)] = -np.inf
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
        work[ex[(ex >= 0) & (ex < len(work))]] = -np.inf
    available = int(np.count_nonzero(work > -np.inf))
    k = min(k, available)
    if k == 0:
        return np.zeros(0, dtype=np.int64), values[:0].copy()
    picked = np.argpartition(-work, k - 1)[:k] if k < len(work) else np.arange(len(work))
    # Tied scores at the partition boundary: take the lowest indices, like a stable sort would.
    kth = work[picked].min()
    tied_outside = np.flatnonzero(work == kth)
    if len(tied_outside) > np.count_nonzero(work[picked] == kth):
        above = picked[work[picked] > kth]
        picked = np.concatenate([above, tied_outside[: k - len(above)]])
    order = np.lexsort((picked, -work[picked]))
    best = picked[order].astype(np.int64)
    return best, values[best]


@dataclass(frozen=True)
class SearchResult:
    """Tiles most similar to a query, best first.

    ``indices`` are rows of the slide's tile grid, ``scores`` their cosine similarity, ``boxes``
    their level-0 ``(x, y, w, h)``; ``query_indices`` are the tiles the query was built from.
    """

    indices: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    query_indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def rows(self) -> list[dict]:
        """One dict per hit (rank, tile, x, y, w, h, score) for tables and CSV output."""
        return [
            {
                "rank": rank + 1,
                "tile": int(i),
                "x": float(box[0]),
                "y": float(box[1]),
                "w": float(box[2]),
                "h": float(box[3]),
                "score": float(s),
            }
            for rank, (i, s, box) in enumerate(
                zip(self.indices, self.scores, self.boxes, strict=True)
            )
        ]


def search_similar(
    features_normed: np.ndarray,
    coords: np.ndarray,
    tile_size_l0: float,
    roi: Roi | Sequence | np.ndarray,
    k: int = 20,
    exclude_query: bool = True,
) -> SearchResult:
    """Find the ``k`` tiles most similar to the tiles inside ``roi``.

    ``features_normed`` comes from :func:`normalize` (done once per slide). The query tiles
    themselves are left out of the results unless ``exclude_query`` is False.
    """
    feats = _as_features(features_normed)
    if len(feats) != len(coords):
        raise ParameterError(
            f"features have {len(feats)} rows but there are {len(coords)} tile coords; "
            "they must come from the same embedding store"
        )
    query_idx = tiles_in_roi(coords, tile_size_l0, roi)
    query = query_vector(feats, query_idx)
    scores = similarity(feats, query)
    best, best_scores = top_k(scores, k, exclude=query_idx if exclude_query else None)
    return SearchResult(
        indices=best,
        scores=best_scores,
        boxes=tile_boxes(np.asarray(coords)[best], tile_size_l0),
        query_indices=query_idx,
    )
