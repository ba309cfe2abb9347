"""Seeded clustered unit vectors that behave like tile embeddings, generated in chunks.

Tests and benchmarks of the library index need millions of vectors with the structure that
makes nearest-neighbour search on real tile embeddings easy or hard: tiles form clusters of
uneven size (tissue types), all embeddings share a common direction (random tiles have a
cosine similarity around 0.5), and the variation between and within clusters lives mostly in
a few hundred directions with a decaying spectrum, over a small full-rank noise floor.
Uniform random vectors have none of this and would make approximate search look either far
worse (no clusters) or better (no near ties) than it is on real data.

Row ``i`` depends only on ``seed`` and the chunk that holds it, so a 20 GB set can be
streamed twice (index, then ground truth) without being kept anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from napari_gpfm.errors import ParameterError

# Relative norms of the parts of a vector before it is normalised.
_MEAN_NORM = 1.0
_CENTRE_NORM = 0.8
_WITHIN_NORM = 0.45
_NOISE_NORM = 0.25
# Directions that carry the between-cluster and within-cluster variation.
_CENTRE_RANK = 128
_WITHIN_RANK = 48
_QUERY_STREAM = 1 << 40


class ClusteredEmbeddings:
    """An endless, reproducible source of ``dim``-d unit vectors drawn from a cluster mixture.

    ``chunk(start, stop)`` returns rows ``start..stop-1`` as float32; rows are generated in
    blocks of ``block`` rows, each from its own seeded stream, so any range can be produced
    without generating what comes before it. ``queries(n)`` draws vectors from the same
    mixture but from a stream that never overlaps the rows.
    """

    def __init__(
        self,
        dim: int,
        n_clusters: int = 2000,
        seed: int = 0,
        block: int = 8192,
    ) -> None:
        if int(dim) < 2:
            raise ParameterError(f"dim={dim!r} must be at least 2")
        if int(n_clusters) < 1:
            raise ParameterError(f"n_clusters={n_clusters!r} must be at least 1")
        self.dim = int(dim)
        self.n_clusters = int(n_clusters)
        self.seed = int(seed)
        self.block = int(block)
        rng = np.random.default_rng([self.seed, 0])
        centre_rank = min(_CENTRE_RANK, self.dim)
        self._within_rank = min(_WITHIN_RANK, self.dim)
        basis, _ = np.linalg.qr(rng.standard_normal((self.dim, centre_rank)))
        self._basis = basis.T.astype(np.float32)  # (rank, dim), orthonormal rows
        mean = rng.standard_normal(self.dim)
        self._mean = (_MEAN_NORM * mean / np.linalg.norm(mean)).astype(np.float32)
        spectrum = 1.0 / np.sqrt(1.0 + np.arange(centre_rank))
        coeffs = rng.standard_normal((self.n_clusters, centre_rank)) * spectrum
        coeffs *= _CENTRE_NORM / np.sqrt(np.sum(spectrum**2))
        self._centres = (coeffs @ self._basis + self._mean).astype(np.float32)
        # Uneven cluster sizes, as tissue types are.
        self._weights = rng.dirichlet(np.full(self.n_clusters, 0.7))
        within = 1.0 / np.sqrt(1.0 + np.arange(self._within_rank))
        self._within_scale = (within * _WITHIN_NORM / np.sqrt(np.sum(within**2))).astype(
            np.float32
        )
        # Each cluster varies along its own mix of the shared directions.
        self._within_rotation = rng.permutation(centre_rank)[: self._within_rank]

    def _block(self, stream: int, index: int, size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, stream, index])
        labels = rng.choice(self.n_clusters, size=size, p=self._weights)
        out = self._centres[labels]
        latent = rng.standard_normal((size, self._within_rank), dtype=np.float32)
        latent *= self._within_scale
        out += latent @ self._basis[self._within_rotation]
        # The noise floor is uniform with the variance of the intended Gaussian: its shape does
        # not matter after normalisation and uniform draws are four times cheaper.
        noise = rng.random((size, self.dim), dtype=np.float32)
        noise -= 0.5
        noise *= _NOISE_NORM * np.sqrt(12.0 / self.dim)
        out += noise
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def _rows(self, stream: int, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop:
            raise ParameterError(f"row range {start}..{stop} must satisfy 0 <= start <= stop")
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        first, last = start // self.block, (stop - 1) // self.block if stop > start else -1
        for b in range(first, last + 1):
            lo, hi = b * self.block, (b + 1) * self.block
            rows = self._block(stream, b, self.block)
            a, z = max(lo, start), min(hi, stop)
            out[a - start : z - start] = rows[a - lo : z - lo]
        return out

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1`` as float32 unit vectors ``(stop - start, dim)``."""
        return self._rows(0, int(start), int(stop))

    def iter_chunks(self, n: int, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` for the first ``n`` rows, ``chunk_rows`` at a time."""
        for start in range(0, int(n), int(chunk_rows)):
            yield start, self.chunk(start, min(int(n), start + int(chunk_rows)))

    def queries(self, n: int) -> np.ndarray:
        """``n`` query vectors from the same mixture, never equal to any row."""
        return self._rows(_QUERY_STREAM, 0, int(n))
