"""Time one in-slide similarity query over 50k tiles x 1024 dims.

Fast path (what napari-gpfm does): features L2-normalised once as float32, then per query one
float32 matrix-vector product and an argpartition top-k. Naive baseline: cosine computed from
the raw float64 features on every query (norms included) and a full argsort.

    python bench/bench_search_inslide.py [--tiles 50000] [--dims 1024] [--k 100] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from napari_gpfm.analysis.search import normalize, query_vector, similarity, tiles_in_roi, top_k


def _median_ms(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up (page faults, BLAS thread start)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(args.tiles)))
    ys, xs = np.divmod(np.arange(args.tiles), side)
    coords = np.column_stack([xs * 224, ys * 224]).astype(np.int64)
    raw = rng.standard_normal((args.tiles, args.dims), dtype=np.float32).astype(np.float64)

    start = time.perf_counter()
    normed = normalize(raw)
    normalise_ms = (time.perf_counter() - start) * 1000.0

    query_tiles = tiles_in_roi(coords, 224, (224 * 10, 224 * 10, 224 * 4, 224 * 4))

    def fast():
        q = query_vector(normed, query_tiles)
        return top_k(similarity(normed, q), args.k, exclude=query_tiles)[0]

    def naive():
        q = raw[query_tiles] / np.linalg.norm(raw[query_tiles], axis=1, keepdims=True)
        q = q.mean(axis=0)
        scores = raw @ q / (np.linalg.norm(raw, axis=1) * np.linalg.norm(q))
        scores[query_tiles] = -np.inf
        return np.argsort(-scores, kind="stable")[: args.k]

    fast_ms, fast_idx = _median_ms(fast, args.repeats)
    naive_ms, naive_idx = _median_ms(naive, max(3, args.repeats // 4))
    same = np.array_equal(fast_idx, naive_idx)
    overlap = len(set(fast_idx.tolist()) & set(naive_idx.tolist()))

    print(f"tiles={args.tiles} dims={args.dims} k={args.k} query tiles={len(query_tiles)}")
    print(f"normalise once:           {normalise_ms:8.1f} ms")
    print(f"query (matvec + top-k):   {fast_ms:8.1f} ms  (median of {args.repeats})")
    print(f"naive (f64 cos + argsort): {naive_ms:7.1f} ms")
    print(
        f"speed-up: {naive_ms / fast_ms:.1f}x; same top-{args.k} order: {same} "
        f"(overlap {overlap}/{args.k})"
    )


if __name__ == "__main__":
    main()
