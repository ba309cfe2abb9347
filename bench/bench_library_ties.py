"""Cost of ordering tied library hits: `LibraryIndex.search` top-100 with its tie margin (16
extra candidates, sorted by score then row id) against none, in the same run (a ratio).

    python bench/bench_library_ties.py      # ~1 min; figures go to docs/benchmarks.md
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name, ram_gib  # noqa: E402

D, SLIDES, QUERIES = 1024, 4, 40


def build(root: Path):
    from napari_gpfm.embedding.store import EmbeddingStore
    from napari_gpfm.library import ClusteredEmbeddings, LibraryIndex
    from napari_gpfm.slides import open_slide
    from napari_gpfm.slides.synthetic import write_synthetic_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    spec = TilingSpec(mpp=0.5, read_size=32, model_size=32, min_tissue=0.0)
    gen = ClusteredEmbeddings(D, n_clusters=50, seed=0)
    meta = {"encoder_id": "timm:x@ab", "encoder_name": "timm:x", "weights_sha256": "ab" * 32,
            "embed_dim": D}
    stores = []
    for i in range(SLIDES):
        path = write_synthetic_slide(root / f"s{i}.tif", 4096, 4096, mpp=0.5, seed=i)
        with open_slide(path) as slide:
            store = EmbeddingStore.create(root / f"e{i}" / "x.zarr", slide=slide,
                                          grid=make_grid(slide, spec), encoder_meta=meta)
            n = store.n_tiles
            store.write(np.arange(n), gen.chunk(i * n, (i + 1) * n))
            store.finalize()
            stores.append(store.path)
    return LibraryIndex.build(stores, root / "lib"), gen.chunk(10**7, 10**7 + QUERIES)


def main() -> None:
    import napari_gpfm.library.index as library_index

    with tempfile.TemporaryDirectory() as tmp:
        library, queries = build(Path(tmp))
        shipped = library_index._TIE_MARGIN

        def median_ms(margin: int) -> float:
            library_index._TIE_MARGIN = margin
            times = []
            for q in queries:
                start = time.perf_counter()
                library.search(q, top_k=100)
                times.append(time.perf_counter() - start)
            return statistics.median(times[5:]) * 1e3  # the first queries warm up

        runs: dict[int, list[float]] = {0: [], shipped: []}
        for _ in range(5):  # interleaved, best of 5
            for margin in runs:
                runs[margin].append(median_ms(margin))
        library_index._TIE_MARGIN = shipped
        base, with_ties = min(runs[0]), min(runs[shipped])
        print(f"{cpu_name()}, {ram_gib():.1f} GiB, Python {platform.python_version()}; "
              f"{len(library):,} x {D} flat library")
        print(f"top-100, 1 query: margin 0 {base:.2f} ms, margin {shipped} {with_ties:.2f} ms, "
              f"ratio {with_ties / base:.3f}")


if __name__ == "__main__":
    main()
