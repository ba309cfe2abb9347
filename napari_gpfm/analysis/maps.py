"""Unsupervised maps of a slide's tile features: PCA colours and k-means clusters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_gpfm.analysis.colours import categorical_colours, rgb_to_hex
from napari_gpfm.analysis.search import normalize
from napari_gpfm.errors import ParameterError

# Above this many tiles k-means is fitted on a seeded random subset and then assigns every
# tile to its nearest centre: the centres barely move, and fitting 50k x 1024 would take
# tens of seconds on a laptop CPU.
KMEANS_MAX_FIT_TILES = 20_000


def _check_features(features: np.ndarray) -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ParameterError(f"features must have shape (N, D) with N, D > 0, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ParameterError("features contain NaN or infinity; re-run the embedding")
    return arr


@dataclass(frozen=True, eq=False)
class PcaColours:
    """A fitted PCA colouring: project features and scale each component into [0, 1].

    Keeping the fitted projection lets other feature sets (another slide, new tiles) be
    coloured in the same colour space.
    """

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (n_components, D), unit rows
    low: np.ndarray  # (n_components,) score mapped to 0
    high: np.ndarray  # (n_components,) score mapped to 1
    explained_variance_ratio: np.ndarray  # (n_components,)

    def project(self, features: np.ndarray) -> np.ndarray:
        """Principal-component scores ``(N, n_components)`` float64."""
        arr = np.asarray(features)
        if arr.ndim != 2 or arr.shape[1] != self.mean.shape[0]:
            raise ParameterError(
                f"features must have shape (N, {self.mean.shape[0]}) to use this PCA, "
                f"got {arr.shape}"
            )
        # float32 keeps a 50k x 1024 projection light; the few outputs are then widened.
        centred = arr.astype(np.float32) - self.mean.astype(np.float32)
        return (centred @ self.components.T.astype(np.float32)).astype(np.float64)

    def colours(self, features: np.ndarray) -> np.ndarray:
        """``(N, n_components)`` float in [0, 1] (RGB for three components)."""
        scores = self.project(features)
        span = self.high - self.low
        scaled = np.where(span > 0, (scores - self.low) / np.where(span > 0, span, 1.0), 0.5)
        return np.clip(scaled, 0.0, 1.0)


def _principal_axes(centred: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top principal axes (rows), their variances and the total variance, computed exactly."""
    n, d = centred.shape
    if n > d:
        # Covariance route: one (D, D) product plus a small symmetric eigen-solve is much
        # cheaper than an SVD of the tall (N, D) matrix.
        cov = (centred.T @ centred).astype(np.float64) / max(n - 1, 1)
        variances, vectors = np.linalg.eigh(cov)
        order = np.argsort(variances)[::-1][:n_components]
        return vectors[:, order].T, np.clip(variances[order], 0.0, None), float(np.trace(cov))
    _, sing, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    all_var = sing**2 / max(n - 1, 1)
    return vt[:n_components], all_var[:n_components], float(all_var.sum())


def fit_pca_colours(features: np.ndarray, n_components: int = 3, robust: bool = True) -> PcaColours:
    """Fit the PCA colouring of :func:`pca_rgb` and return it for reuse."""
    arr = _check_features(features)
    n, d = arr.shape
    if isinstance(n_components, bool) or not 1 <= int(n_components) <= min(n, d):
        raise ParameterError(
            f"n_components={n_components} must be between 1 and min(tiles, dims)={min(n, d)}"
        )
    n_components = int(n_components)
    mean = arr.mean(axis=0, dtype=np.float64)
    centred = arr.astype(np.float32) - mean.astype(np.float32)
    axes, variances, total = _principal_axes(centred, n_components)
    # Deterministic signs: the largest-magnitude loading of each axis is positive, so the
    # same features always give the same colours whatever the solver's sign choice.
    pivot = np.argmax(np.abs(axes), axis=1)
    axes = axes * np.sign(axes[np.arange(n_components), pivot])[:, None]
    scores = (centred @ axes.T.astype(np.float32)).astype(np.float64)
    if robust:
        low, high = np.percentile(scores, [1.0, 99.0], axis=0)
    else:
        low, high = scores.min(axis=0), scores.max(axis=0)
    ratio = variances / total if total > 0 else np.zeros_like(variances)
    return PcaColours(
        mean=mean,
        components=axes,
        low=np.asarray(low, dtype=np.float64),
        high=np.asarray(high, dtype=np.float64),
        explained_variance_ratio=ratio,
    )


def pca_rgb(features: np.ndarray, n_components: int = 3, robust: bool = True) -> np.ndarray:
    """Colour each tile by its first principal components: ``(N, n_components)`` in [0, 1].

    Each component is scaled between its 1st and 99th percentile (``robust``) or its min and
    max, so a few outlier tiles do not wash out the rest. With 3 components the result is RGB.
    """
    return fit_pca_colours(features, n_components, robust).colours(features)


@dataclass(frozen=True, eq=False)
class ClusterResult:
    """k-means clusters, numbered by size (cluster 0 is the largest).

    ``centers`` live in the L2-normalised feature space the clustering ran in; ``colours`` is
    ``(k, 3)`` uint8, one per cluster.
    """

    labels: np.ndarray  # (N,) int64
    centers: np.ndarray  # (k, D) float32
    colours: np.ndarray  # (k, 3) uint8

    @property
    def k(self) -> int:
        return len(self.centers)


def kmeans_clusters(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    n_init: int = 3,
    max_fit_tiles: int = KMEANS_MAX_FIT_TILES,
) -> ClusterResult:
    """Cluster tiles with k-means on L2-normalised features (cosine geometry).

    Results are reproducible for a given ``seed``. With more than ``max_fit_tiles`` tiles the
    centres are fitted on a seeded random subset and every tile is then assigned.
    """
    from sklearn.cluster import KMeans

    arr = _check_features(features)
    n = len(arr)
    if isinstance(k, bool) or int(k) != k or not 2 <= k <= n:
        raise ParameterError(f"number of clusters k={k} must be between 2 and the tile count {n}")
    k = int(k)
    normed = normalize(arr)
    fit_rows = normed
    if n > max_fit_tiles:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=max_fit_tiles, replace=False))
        fit_rows = normed[pick]
    model = KMeans(n_clusters=k, n_init=n_init, max_iter=300, random_state=seed)
    model.fit(fit_rows)
    labels = model.predict(normed) if fit_rows is not normed else model.labels_
    centers = model.cluster_centers_.astype(np.float32)

    # Renumber by decreasing size (ties: by old number) so numbering and colours are stable.
    sizes = np.bincount(labels, minlength=k)
    order = np.lexsort((np.arange(k), -sizes))
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return ClusterResult(
        labels=rank[labels].astype(np.int64),
        centers=centers[order],
        colours=categorical_colours(k),
    )


def cluster_table(
    labels: np.ndarray,
    k: int,
    tile_area_mm2: float,
    colours: np.ndarray | None = None,
) -> list[dict]:
    """One row per cluster: ``cluster, colour (#rrggbb), tiles, area_mm2, fraction``.

    ``tile_area_mm2`` is the area one tile stands for (see
    :func:`napari_gpfm.analysis.geometry.tile_area_mm2`).
    """
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if lab.size and (lab.min() < 0 or lab.max() >= k):
        raise ParameterError(f"cluster labels must be in [0, {k}), got {lab.min()}..{lab.max()}")
    palette = categorical_colours(k) if colours is None else np.asarray(colours, dtype=np.uint8)
    counts = np.bincount(lab, minlength=k)
    total = max(int(counts.sum()), 1)
    return [
        {
            "cluster": c,
            "colour": rgb_to_hex(palette[c]),
            "tiles": int(counts[c]),
            "area_mm2": float(counts[c] * tile_area_mm2),
            "fraction": float(counts[c] / total),
        }
        for c in range(k)
    ]
