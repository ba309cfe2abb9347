"""The vector engine under the library: one faiss index of L2-normalised float32 vectors.

Similarity is the inner product of unit vectors (cosine). Every vector carries a stable
int64 id (the library's row id), so removing vectors never renumbers the others. Three kinds
of index, chosen by :func:`choose_kind` unless asked for. Figures for D = 1024, measured on a
shared 2-core Xeon VM under a load average of 7-9 (``bench/bench_search.py``,
``docs/benchmarks.md``); an idle machine is several times faster:

``flat``  exact ``IndexFlatIP`` (inside an ``IndexIDMap``). 4·D bytes per vector (4 KiB),
          memory-mapped from disk; build = one copy; recall 1.0. A query reads every vector:
          2.4 s for one query at 1M vectors, 0.8 s per query in a batch of 20.
          Removal: ``remove_ids`` on the ID map (compacts in place, no rebuild).
``ivfpq`` ``PCAR128, IVF{nlist}, PQ64x4fs`` + exact re-ranking. In RAM: 32 bytes of 4-bit
          fast-scan PQ code + an 8-byte id per vector; nlist = sqrt(N) rounded down to a power
          of two, so a query scans nprobe/nlist of the codes. Its shortlist of candidates is
          re-scored exactly from float16 copies of the vectors that the caller keeps on disk
          (``fetch``): the scores returned are exact, only *which* vectors reach the shortlist
          is approximate. nprobe and the shortlist depth are tuned after each build to reach
          recall@100 >= 0.95 against exact search (tuning aims at 0.97); measured recall@100
          0.99, 50-65 ms for one query (mostly reading and converting the shortlist's
          float16 rows), 27-40 ms per query in a batch, at 1M-3M vectors. Build: PCA,
          k-means and PQ training on a sample (1.5-2 minutes), then ~13-23k vectors/s.
          Removal: ``remove_ids`` on the inverted lists.
``hnsw``  ``IndexHNSWFlat`` (M=32) inside an ``IndexIDMap``: 4·D + 8·M bytes per vector in
          RAM, low latency at moderate N, the slowest build (each insert is a graph search:
          ~1.2k vectors/s at D=64 here). efSearch is tuned like nprobe. faiss cannot remove
          from HNSW: removal rebuilds the graph from the caller's vectors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import IndexError_, ParameterError

KINDS = ("flat", "ivfpq", "hnsw")
# "auto" searches exactly while the float32 vectors of a flat index stay within this size:
# 2M vectors at D=1024. Beyond, a flat query reads more than 8 GiB and takes seconds.
AUTO_FLAT_MAX_BYTES = 8 << 30
# PQ codebooks and the coarse k-means need this many vectors to be trained meaningfully.
IVFPQ_MIN_VECTORS = 10_000
# ivfpq works in a PCA-rotated space of this many dimensions (when D is larger): the coarse
# assignment and the codes only pick candidates, the exact re-ranking uses all D dimensions.
IVFPQ_PCA_DIM = 128
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
RECALL_K = 100
RECALL_GOAL = 0.95
# Tuning aims above the goal: recall measured on a few dozen queries varies by about +-0.01.
TUNE_TARGET = 0.97
NPROBE_STEPS = (8, 16, 32, 64, 128, 256, 512)
SHORTLIST_STEPS = (1000, 2000, 4000)
EF_SEARCH_STEPS = (128, 256, 512, 1024, 2048)
# Queries are re-ranked this many at a time, to bound the float16 rows held at once.
_RERANK_BATCH = 32
# Below this many queries faiss runs on one thread: a single IVF query is a millisecond of
# work and waking OpenMP threads on a busy machine costs ten times that (measured: 11 ms on
# 2 threads vs 1 ms on 1 at 1M vectors on a loaded 2-core VM).
_THREADED_QUERIES = 4

Fetch = Callable[[np.ndarray], np.ndarray]


def _faiss():
    import faiss

    return faiss


@contextlib.contextmanager
def _faiss_threads(n_queries: int) -> Iterator[None]:
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    if n_queries < _THREADED_QUERIES and before > 1:
        faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(before)
    else:
        yield


def advise_random(array: np.ndarray) -> np.ndarray:
    """Tell the OS that a memory-mapped array is read at random rows (no read-ahead).

    Re-ranking reads a few thousand scattered 2 KiB rows per query; read-ahead would turn
    each of them into a much larger disk read when the file is not in the page cache.
    """
    import mmap

    base = getattr(array, "_mmap", None)
    if base is not None and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError, ValueError):
            base.madvise(mmap.MADV_RANDOM)
    return array


def choose_kind(n_vectors: int, dim: int) -> str:
    """``flat`` while ``n_vectors * dim * 4`` bytes fit :data:`AUTO_FLAT_MAX_BYTES`, else
    ``ivfpq`` (see the module docstring for the trade-off)."""
    return "flat" if int(n_vectors) * int(dim) * 4 <= AUTO_FLAT_MAX_BYTES else "ivfpq"


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


@dataclass
class EngineConfig:
    """How the index is built and searched; kept in the library's ``meta.json``."""

    kind: str
    dim: int
    nlist: int = 0
    pca_dim: int = 0
    pq_m: int = 0
    hnsw_m: int = 0
    nprobe: int = 0
    shortlist: int = 0
    ef_search: int = 0
    trained_rows: int = 0
    tuned_rows: int = 0
    tuned_recall: float | None = None

    @classmethod
    def plan(cls, kind: str, n_vectors: int, dim: int) -> EngineConfig:
        """Parameters for ``kind`` (``auto`` resolved by :func:`choose_kind`) at this size."""
        n_vectors, dim = int(n_vectors), int(dim)
        if kind == "auto":
            kind = choose_kind(n_vectors, dim)
        if kind not in KINDS:
            raise ParameterError(f"--kind {kind!r}: use auto, {', '.join(KINDS)}")
        if kind == "flat":
            return cls(kind="flat", dim=dim)
        if kind == "hnsw":
            return cls(kind="hnsw", dim=dim, hnsw_m=HNSW_M, ef_search=EF_SEARCH_STEPS[0])
        if n_vectors < IVFPQ_MIN_VECTORS:
            raise ParameterError(
                f"--kind ivfpq needs at least {IVFPQ_MIN_VECTORS} vectors to train its codebooks, "
                f"this library has {n_vectors}; use --kind flat (exact) or auto"
            )
        # The PQ works on pairs of dimensions (4-bit fast-scan codes, 16 bytes per 32 dims).
        pca_dim = min(IVFPQ_PCA_DIM, dim - dim % 4)
        nlist = min(65536, max(16, _pow2_floor(math.sqrt(n_vectors))))
        return cls(
            kind="ivfpq", dim=dim, nlist=nlist, pca_dim=pca_dim if pca_dim != dim else 0,
            pq_m=pca_dim // 2, nprobe=32, shortlist=SHORTLIST_STEPS[0],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> EngineConfig:
        """Read a config written by :meth:`to_dict`; raises ``ValueError`` if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("engine settings are not a mapping")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown engine settings {sorted(unknown)}")
        config = cls(**data)
        if config.kind not in KINDS or int(config.dim) < 1:
            raise ValueError(f"engine kind {config.kind!r} / dim {config.dim!r} are invalid")
        if config.kind == "ivfpq" and not (config.nlist > 0 and config.pq_m > 0):
            raise ValueError("ivfpq settings lack nlist / pq_m")
        return config

    @property
    def factory(self) -> str:
        """The faiss ``index_factory`` string of the (unwrapped) index."""
        if self.kind == "flat":
            return "IDMap,Flat"
        if self.kind == "hnsw":
            return f"IDMap,HNSW{self.hnsw_m},Flat"
        coarse = f"IVF{self.nlist}_HNSW32" if self.nlist >= 1024 else f"IVF{self.nlist}"
        pca = f"PCAR{self.pca_dim}," if self.pca_dim else ""
        return f"{pca}{coarse},PQ{self.pq_m}x4fs"

    def memory_per_vector(self) -> tuple[int, int]:
        """``(bytes in the faiss index, bytes of float16 copy the library keeps on disk)``."""
        copy = 2 * self.dim
        if self.kind == "flat":
            return 4 * self.dim + 8, copy
        if self.kind == "hnsw":
            return 4 * self.dim + 8 * self.hnsw_m + 8, copy
        return self.pq_m // 2 + 8, copy

    def shortlist_for(self, k: int) -> int:
        """Candidates taken from the codes before exact re-ranking, for a top-``k`` query."""
        return max(int(k), math.ceil(self.shortlist * max(int(k), RECALL_K) / RECALL_K))

    def describe(self) -> str:
        """One line: kind, parameters, tuned recall."""
        if self.kind == "flat":
            text = "flat (exact IndexFlatIP)"
        elif self.kind == "hnsw":
            text = f"hnsw (M={self.hnsw_m}, efSearch={self.ef_search})"
        else:
            text = (f"ivfpq ({self.factory}, nprobe={self.nprobe}, "
                    f"re-ranking {self.shortlist} per 100)")
        if self.tuned_recall is not None:
            text += f", recall@{RECALL_K} {self.tuned_recall:.3f} at {self.tuned_rows} vectors"
        return text


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (``-1`` entries are ignored)."""
    found = np.atleast_2d(found)
    truth = np.atleast_2d(truth)
    values = []
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        if len(t):
            values.append(len(np.intersect1d(f[f >= 0], t)) / len(t))
    return float(np.mean(values)) if values else 1.0


def exact_top_k(
    queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top ``k`` by inner product over ``(ids, vectors)`` chunks, best first.

    Streams: only one chunk and the ``(Q, k)`` running best are held at a time. Returns
    ``(scores (Q, k) float32, ids (Q, k) int64)`` padded with ``-inf`` / ``-1``.
    """
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for ids, vectors in chunks:
        if len(ids) == 0:
            continue
        scores = q @ np.asarray(vectors, dtype=np.float32).T  # (Q, n)
        all_s = np.concatenate([best_s, scores], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k] if all_s.shape[1] > k else None
        if top is not None:
            all_s = np.take_along_axis(all_s, top, 1)
            all_i = np.take_along_axis(all_i, top, 1)
        best_s, best_i = all_s, all_i
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


class VectorEngine:
    """A faiss index of unit vectors with stable int64 ids, and its search settings."""

    def __init__(self, config: EngineConfig, index: Any):
        self.config = config
        self.index = index
        self._transform: tuple[np.ndarray, np.ndarray | None] | None = None
        self._apply_search_settings()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, config: EngineConfig, training: np.ndarray | None = None) -> VectorEngine:
        """A new, empty index; ``ivfpq`` is trained on ``training`` (unit rows, float32)."""
        faiss = _faiss()
        index = faiss.index_factory(config.dim, config.factory, faiss.METRIC_INNER_PRODUCT)
        if config.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if config.kind == "ivfpq":
            if training is None or len(training) < IVFPQ_MIN_VECTORS:
                raise ParameterError(
                    f"ivfpq needs at least {IVFPQ_MIN_VECTORS} training vectors; use --kind flat"
                )
            ivf = faiss.extract_index_ivf(index)
            # 10 k-means iterations instead of 25: the codes only choose candidates for the
            # exact re-ranking, and training time is the bulk of a build on a small CPU.
            ivf.cp.niter = 10
            faiss.downcast_index(ivf).pq.cp.niter = 10
            index.train(np.ascontiguousarray(training, dtype=np.float32))
            config.trained_rows = int(len(training))
        return cls(config, index)

    @staticmethod
    def training_size(config: EngineConfig, n_vectors: int) -> int:
        """How many vectors to train ``ivfpq`` on: ~64 per coarse list, at least 2^15."""
        if config.kind != "ivfpq":
            return 0
        return int(min(n_vectors, max(64 * config.nlist, 1 << 15)))

    @classmethod
    def load(cls, path: str | Path, config: EngineConfig, *, mmap: bool = True) -> VectorEngine:
        """Read an index written by :meth:`save`; memory-mapped (read-only) when ``mmap``.

        A file faiss cannot parse raises :class:`IndexError_`.
        """
        faiss = _faiss()
        flags = 0
        if mmap:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else "unreadable"
            raise IndexError_(
                f"{path} is corrupted ({reason}); rebuild the library with `gpfm index build`"
            ) from None
        if index.d != config.dim or not _is_kind(index, config.kind):
            raise IndexError_(
                f"{path} does not hold the {config.kind} index of {config.dim}-d vectors that "
                "meta.json describes; rebuild the library with `gpfm index build`"
            )
        return cls(config, index)

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` (the caller makes the write atomic)."""
        _faiss().write_index(self.index, str(path))

    # ------------------------------------------------------------------ contents
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def supports_remove(self) -> bool:
        """False for HNSW: removing means rebuilding from the vectors."""
        return self.config.kind != "hnsw"

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add unit rows ``vectors (n, D)`` under ``ids (n,)`` int64."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        i = np.ascontiguousarray(ids, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.config.dim or len(x) != len(i):
            raise ParameterError(
                f"vectors of shape {x.shape} with {len(i)} ids do not fit a "
                f"{self.config.dim}-d index"
            )
        if not len(x):
            return
        if self.config.kind == "ivfpq":
            self._add_ivf(x, i)
        else:
            self.index.add_with_ids(x, i)

    def _add_ivf(self, x: np.ndarray, ids: np.ndarray) -> None:
        faiss = _faiss()
        target = self.index
        if isinstance(self.index, faiss.IndexPreTransform):
            # The PCA is one affine map; numpy's BLAS applies it ~3x faster than the BLAS
            # bundled with faiss-cpu on the machines we measured, and it is the largest
            # single cost of adding vectors. The result goes to the wrapped IVF index,
            # exactly as IndexPreTransform.add_with_ids would pass it on.
            matrix, bias = self._linear_transform()
            x = x @ matrix.T
            if bias is not None:
                x += bias
            target = faiss.downcast_index(self.index.index)
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer)
        hnsw = getattr(quantizer, "hnsw", None)
        ef = hnsw.efSearch if hnsw is not None else 0
        if hnsw is not None:
            hnsw.efSearch = 16  # adding needs the nearest list only; searching wants more
        try:
            target.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
        finally:
            if hnsw is not None:
                hnsw.efSearch = ef
        self.index.ntotal = target.ntotal

    def _linear_transform(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._transform is None:
            faiss = _faiss()
            chain = self.index.chain
            if chain.size() != 1:
                raise ValueError("expected a single PCA transform before the IVF index")
            lt = faiss.downcast_VectorTransform(chain.at(0))
            matrix = faiss.vector_to_array(lt.A).reshape(lt.d_out, lt.d_in).astype(np.float32)
            bias = faiss.vector_to_array(lt.b).astype(np.float32) if lt.have_bias else None
            self._transform = (matrix, bias)
        return self._transform

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors with these ids; return how many were removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        if not self.supports_remove:
            raise ParameterError("an hnsw index cannot remove vectors; rebuild it instead")
        faiss = _faiss()
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    # ------------------------------------------------------------------ search
    def _apply_search_settings(self) -> None:
        faiss = _faiss()
        cfg = self.config
        if cfg.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = int(min(cfg.nprobe or 32, cfg.nlist))
            quantizer = faiss.downcast_index(ivf.quantizer)
            if hasattr(quantizer, "hnsw"):
                quantizer.hnsw.efSearch = max(64, 2 * ivf.nprobe)
        elif cfg.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = int(cfg.ef_search)

    def search(
        self, queries: np.ndarray, k: int, fetch: Fetch | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of unit ``queries (Q, D)``: ``(scores (Q, k) float32, ids (Q, k) int64)``.

        Best first; short rows are padded with ``-inf`` / ``-1``. ``ivfpq`` needs ``fetch``:
        a function from sorted unique ids to their vectors (any float dtype), used to re-rank
        the shortlist exactly.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = int(k)
        if k < 1:
            raise ParameterError(f"top_k={k} must be at least 1")
        if self.ntotal == 0:
            return (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        if self.config.kind == "flat":
            return self._search_raw(q, k)
        if self.config.kind == "hnsw":
            ef = max(int(self.config.ef_search), k)
            hnsw = _faiss().downcast_index(self.index.index).hnsw
            hnsw.efSearch = ef
            try:
                return self._search_raw(q, k)
            finally:
                hnsw.efSearch = int(self.config.ef_search)
        if fetch is None:
            raise ParameterError("an ivfpq search needs the stored vectors to re-rank (fetch=)")
        shortlist = min(self.config.shortlist_for(k), max(k, self.ntotal))
        _, candidates = self._search_raw(q, shortlist)
        return _rerank(q, candidates, k, fetch)

    def _search_raw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with _faiss_threads(len(q)):
            scores, ids = self.index.search(q, k)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

    # ------------------------------------------------------------------ tuning
    def tune(
        self,
        queries: np.ndarray,
        truth: np.ndarray,
        fetch: Fetch | None = None,
        target: float = TUNE_TARGET,
    ) -> float:
        """Pick the cheapest nprobe/shortlist (ivfpq) or efSearch (hnsw) reaching ``target``
        recall@k against ``truth`` (exact top-k ids of ``queries``); return the recall reached.

        If no setting reaches it, the most thorough one is kept and its recall returned.
        """
        cfg = self.config
        k = int(np.atleast_2d(truth).shape[1])
        if cfg.kind == "flat":
            cfg.tuned_recall, cfg.tuned_rows = 1.0, self.ntotal
            return 1.0
        if cfg.kind == "hnsw":
            trials = [{"ef_search": ef} for ef in EF_SEARCH_STEPS]
        else:
            # Cheapest first: a deeper re-ranking reads more float16 rows (from disk when
            # they are not cached), while more probes only scan more 32-byte codes.
            trials = [
                {"nprobe": p, "shortlist": s}
                for s in SHORTLIST_STEPS
                for p in NPROBE_STEPS if p <= cfg.nlist
            ]
        recall = 0.0
        for trial in trials:
            for name, value in trial.items():
                setattr(cfg, name, value)
            self._apply_search_settings()
            _, found = self.search(queries, k, fetch)
            recall = recall_at_k(found, truth)
            if recall >= target:
                break
        cfg.tuned_recall, cfg.tuned_rows = float(recall), self.ntotal
        return float(recall)


def _rerank(
    queries: np.ndarray, candidates: np.ndarray, k: int, fetch: Fetch
) -> tuple[np.ndarray, np.ndarray]:
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), _RERANK_BATCH):
        cand = candidates[start : start + _RERANK_BATCH]
        valid = cand >= 0
        uniq, inverse = np.unique(cand[valid], return_inverse=True)
        if not len(uniq):
            continue
        vectors = np.asarray(fetch(uniq), dtype=np.float32)
        slot = np.full(cand.shape, -1, dtype=np.int64)
        slot[valid] = inverse
        for row, (query, slots) in enumerate(zip(queries[start : start + len(cand)], slot,
                                                 strict=True)):
            slots = slots[slots >= 0]
            scores = vectors[slots] @ query
            ids = uniq[slots]
            take = min(k, len(ids))
            order = np.lexsort((ids, -scores))[:take]
            out_s[start + row, :take] = scores[order]
            out_i[start + row, :take] = ids[order]
    return out_s, out_i


def _is_kind(index: Any, kind: str) -> bool:
    faiss = _faiss()
    if kind in ("flat", "hnsw"):
        if not isinstance(index, faiss.IndexIDMap):
            return False
        inner = faiss.downcast_index(index.index)
        return isinstance(inner, faiss.IndexHNSW if kind == "hnsw" else faiss.IndexFlat)
    try:
        faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return False
    return True
