"""The multi-slide library: exact search, IVF-PQ recall, grouping, add/remove, refusals,
corruption and staleness, on real faiss indexes built from real zarr embedding stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from napari_gpfm.analysis.search import query_vector, tiles_in_roi
from napari_gpfm.embedding.store import EmbeddingStore
from napari_gpfm.errors import IndexError_, ParameterError, StoreError
from napari_gpfm.library import ClusteredEmbeddings, LibraryIndex
from napari_gpfm.library.engine import (
    EngineConfig,
    VectorEngine,
    choose_kind,
    exact_top_k,
    recall_at_k,
)
from napari_gpfm.slides import open_slide
from napari_gpfm.slides.synthetic import write_synthetic_slide
from napari_gpfm.tiling import TilingSpec, make_grid

D = 64
SPEC = TilingSpec(mpp=0.5, read_size=32, model_size=32, min_tissue=0.0)


def encoder_meta(sha: str = "ab" * 32, name: str = "timm:test_vit") -> dict:
    return {"encoder_id": f"{name}@{sha[:12]}", "encoder_name": name, "weights_sha256": sha,
            "embed_dim": D}


def make_store(path, slide_path, features_of, meta=None, spec=SPEC) -> EmbeddingStore:
    """A complete store of ``slide_path`` whose features are ``features_of(n_tiles)``."""
    with open_slide(slide_path) as slide:
        grid = make_grid(slide, spec)
        store = EmbeddingStore.create(path, slide=slide, grid=grid,
                                      encoder_meta=meta or encoder_meta())
        store.write(np.arange(store.n_tiles), features_of(store.n_tiles))
        store.finalize()
    return store


@pytest.fixture(scope="module")
def gen() -> ClusteredEmbeddings:
    return ClusteredEmbeddings(D, n_clusters=30, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gen):
    """Three slides (1024 x 1024 px -> 1024 tiles each) and their stores."""
    root = tmp_path_factory.mktemp("corpus")
    slides, stores = [], []
    for i in range(3):
        slide = write_synthetic_slide(root / f"slide{i}.tif", 1024, 1024, mpp=0.5, seed=i)
        start = i * 1024
        store = make_store(root / f"slide{i}.zarr", slide,
                           lambda n, s=start: gen.chunk(s, s + n) * 3.0)  # not unit length
        slides.append(slide)
        stores.append(store.path)
    return {"root": root, "slides": slides, "stores": stores}


@pytest.fixture(scope="module")
def flat_lib(tmp_path_factory, corpus):
    return LibraryIndex.build(corpus["stores"], tmp_path_factory.mktemp("flat") / "lib")


def brute_force(stores, query, k):
    """(slide fingerprint, tile) and scores of the exact top-k over the stores, in numpy.

    The library keeps float16 copies of the normalised vectors; the same rounding is applied
    here so that the comparison is about search and bookkeeping, not rounding.
    """
    keys, vectors = [], []
    for path in stores:
        store = EmbeddingStore.open(path)
        f = store.features.astype(np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        vectors.append(f.astype(np.float16).astype(np.float32))
        fp = store.attrs["slide_fingerprint"]
        keys += [(fp, t) for t in range(store.n_tiles)]
    allv = np.concatenate(vectors)
    q = np.asarray(query, np.float32) / np.linalg.norm(query)
    scores = allv @ q
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [keys[i] for i in order], scores[order]


def assert_same_ranking(hits, stores, query, k):
    """Hits equal the brute-force top-k; two tiles may swap only when their scores tie to
    within float32 summation noise."""
    keys, scores = brute_force(stores, query, 10**9)
    score_of = dict(zip(keys, scores.tolist(), strict=True))
    got = [(h.slide_fingerprint, h.tile) for h in hits]
    assert len(got) == min(k, len(keys)) and len(set(got)) == len(got)
    np.testing.assert_allclose([h.score for h in hits], scores[:len(got)], atol=1e-5)
    for i, key in enumerate(got):
        assert key == keys[i] or abs(score_of[key] - scores[i]) < 1e-5, (i, key, keys[i])


# ---------------------------------------------------------------------- exact search
def test_flat_search_equals_numpy_brute_force(flat_lib, corpus, gen):
    assert flat_lib.kind == "flat" and len(flat_lib) == 3 * 1024
    queries = gen.queries(4) * 5.0
    batch = flat_lib.search(queries, top_k=50)
    for q, hits_batch in zip(queries, batch, strict=True):
        hits = flat_lib.search(q, top_k=50)
        assert_same_ranking(hits, corpus["stores"], q, 50)
        assert [h.rank for h in hits] == list(range(1, 51))
        assert [(h.slide_fingerprint, h.tile) for h in hits_batch] == [
            (h.slide_fingerprint, h.tile) for h in hits]
    # Boxes are level-0 tile boxes of the right slide.
    hit = flat_lib.search(queries[0], top_k=1)[0]
    store = EmbeddingStore.open(hit.store_path)
    assert store.attrs["slide_fingerprint"] == hit.slide_fingerprint
    assert hit.slide_path == str(store.attrs["slide_path"])
    assert (hit.x, hit.y) == tuple(float(v) for v in store.all_coords[hit.tile])
    assert hit.w == hit.h == pytest.approx(store.tile_size_l0)
    # Scores are cosine similarities of the float32 features, up to float16 storage.
    f = store.features[hit.tile]
    cosine = f @ queries[0] / np.linalg.norm(f) / np.linalg.norm(queries[0])
    assert hit.score == pytest.approx(cosine, abs=2e-3)


def test_search_checks_its_arguments(flat_lib):
    with pytest.raises(ParameterError, match="32-d|64-d"):
        flat_lib.search(np.ones(32, np.float32))
    with pytest.raises(ParameterError, match="zero"):
        flat_lib.search(np.zeros(D, np.float32))
    with pytest.raises(ParameterError, match="top_k"):
        flat_lib.search(np.ones(D, np.float32), top_k=0)
    assert len(flat_lib.search(np.ones(D, np.float32), top_k=10**6)) == len(flat_lib)


def test_group_by_slide_returns_each_slides_best_regions(flat_lib, corpus, gen):
    query = gen.queries(1)[0]
    keys, scores = brute_force(corpus["stores"], query, len(flat_lib))
    best: dict[str, list] = {}
    for key, score in zip(keys, scores, strict=True):
        best.setdefault(key[0], []).append((key[1], score))
    slide_order = list(best)  # dicts keep the order of first (= best) appearance
    for top_k, per_slide in ((2, 3), (3, 600)):  # 600 per slide forces the pool to grow
        hits = flat_lib.search(query, top_k=top_k, group_by_slide=True, per_slide=per_slide)
        assert [h.slide_rank for h in hits] == [
            r for r in range(1, top_k + 1) for _ in range(per_slide)]
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        for rank, fp in enumerate(slide_order[:top_k], 1):
            mine = [h for h in hits if h.slide_rank == rank]
            assert {h.slide_fingerprint for h in mine} == {fp}
            assert len({h.tile for h in mine}) == per_slide
            # The slide's best tiles (equal scores may trade places).
            want = [score for _, score in best[fp][:per_slide]]
            np.testing.assert_allclose([h.score for h in mine], want, atol=1e-5)


def test_roi_query_uses_the_store_tiles_and_leaves_them_out(flat_lib, corpus):
    store = EmbeddingStore.open(corpus["stores"][1])
    fp = store.attrs["slide_fingerprint"]
    roi = (100.0, 200.0, 160.0, 96.0)
    inside = tiles_in_roi(store.all_coords, store.tile_size_l0, roi)
    assert len(inside) > 3
    vector, own = flat_lib.query_from_store(store.path, roi)
    np.testing.assert_allclose(vector, query_vector(store.features, inside), atol=1e-6)
    assert len(own) == len(inside)
    full = [(h.slide_fingerprint, h.tile) for h in flat_lib.search(vector, 40 + len(inside))]
    mine = {(fp, int(t)) for t in inside}
    hits = flat_lib.search_roi(store.path, roi, top_k=40)
    assert [(h.slide_fingerprint, h.tile) for h in hits] == [k for k in full if k not in mine][:40]
    with_own = flat_lib.search_roi(store.path, roi, top_k=40, exclude_query=False)
    assert [(h.slide_fingerprint, h.tile) for h in with_own] == full[:40]
    # A one-tile region finds itself first unless it is excluded.
    x, y = store.all_coords[77]
    one = (float(x), float(y), store.tile_size_l0, store.tile_size_l0)
    first = flat_lib.search_roi(store.path, one, top_k=5, exclude_query=False)[0]
    assert (first.slide_fingerprint, first.tile) == (fp, 77) and first.score > 0.999
    assert (fp, 77) not in {(h.slide_fingerprint, h.tile)
                            for h in flat_lib.search_roi(store.path, one, top_k=50)}


# ---------------------------------------------------------------------- approximate search
def test_ivfpq_recall_at_100_on_200k_structured_vectors():
    gen = ClusteredEmbeddings(D, n_clusters=400, seed=11)
    n = 200_000
    vectors = gen.chunk(0, n)
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # ids need not be positions
    queries = gen.queries(40)
    evals, tunes = queries[:20], queries[20:]
    chunks = [(ids[s: s + 50_000], vectors[s: s + 50_000]) for s in range(0, n, 50_000)]
    _, truth = exact_top_k(queries, chunks, 100)
    config = EngineConfig.plan("ivfpq", n, D)
    rng = np.random.default_rng(0)
    train = vectors[np.sort(rng.choice(n, VectorEngine.training_size(config, n), replace=False))]
    engine = VectorEngine.create(config, train)
    engine.add(vectors, ids)

    def fetch(wanted):
        return vectors[(wanted - 3) // 7]

    tuned = engine.tune(tunes, truth[20:], fetch)
    assert tuned >= 0.95
    scores, found = engine.search(evals, 100, fetch)
    assert recall_at_k(found, truth[:20]) >= 0.95
    # Approximate for real: a query probes a small share of the lists ...
    assert config.nprobe <= config.nlist // 4
    # ... and the scores it returns are exact (re-ranked from the stored vectors).
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", evals, fetch(found)), atol=1e-5)
    # Removing vectors by id drops exactly those.
    gone = np.unique(found[:, :50])
    assert engine.remove(gone) == len(gone) and engine.ntotal == n - len(gone)
    _, after = engine.search(evals, 100, fetch)
    assert not np.isin(after, gone).any() and (after >= 0).all()


def test_choose_kind_and_plan():
    assert choose_kind(2 * 1024**2, 1024) == "flat"
    assert choose_kind(2 * 1024**2 + 1, 1024) == "ivfpq"
    assert EngineConfig.plan("ivfpq", 10_000_000, 1024).factory == (
        "PCAR128,IVF2048_HNSW32,PQ64x4fs")
    assert EngineConfig.plan("ivfpq", 200_000, 64).factory == "IVF256,PQ32x4fs"
    with pytest.raises(ParameterError, match="at least 10000 vectors") as err:
        EngineConfig.plan("ivfpq", 5000, D)
    assert "\n" not in str(err.value)
    with pytest.raises(ParameterError, match="--kind"):
        EngineConfig.plan("annoy", 5000, D)


@pytest.fixture(scope="module")
def big_stores(tmp_path_factory, gen):
    """Two slides of 1536 x 1536 px cut into 16 px tiles: 9216 tiles each."""
    root = tmp_path_factory.mktemp("big")
    spec = TilingSpec(mpp=0.5, read_size=16, model_size=16, min_tissue=0.0)
    stores = []
    for i in range(2):
        slide = write_synthetic_slide(root / f"big{i}.tif", 1536, 1536, mpp=0.5, seed=10 + i)
        start = 100_000 + i * 20_000
        stores.append(make_store(root / f"big{i}.zarr", slide,
                                 lambda n, s=start: gen.chunk(s, s + n), spec=spec).path)
    return stores


def test_auto_library_switches_to_ivfpq_as_it_grows(tmp_path, big_stores, gen, monkeypatch):
    from napari_gpfm.library import engine as engine_module

    # Pretend flat search is worth it up to 3 MB of float32 vectors (one store is 2.4 MB).
    monkeypatch.setattr(engine_module, "AUTO_FLAT_MAX_BYTES", 3 << 20)
    lib = LibraryIndex.build(big_stores[:1], tmp_path / "lib")
    assert lib.kind == "flat"
    lib.add(big_stores[1:])
    assert lib.kind == "ivfpq" and len(lib) == 2 * 9216
    assert lib.engine.config.tuned_recall >= 0.95
    exact = LibraryIndex.build(big_stores, tmp_path / "exact", kind="flat")
    queries = gen.queries(10)
    found = [[(h.slide_fingerprint, h.tile) for h in hits] for hits in lib.search(queries, 100)]
    truth = [[(h.slide_fingerprint, h.tile) for h in hits] for hits in exact.search(queries, 100)]
    recall = np.mean([len(set(f) & set(t)) / 100 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95
    # Scores are exact: re-ranked from the stored vectors.
    exact_scores = {(h.slide_fingerprint, h.tile): h.score for h in exact.search(queries[0], 300)}
    for hit in lib.search(queries[0], 20):
        assert hit.score == pytest.approx(exact_scores[(hit.slide_fingerprint, hit.tile)],
                                          abs=1e-5)
    # Reopened memory-mapped, it answers the same.
    again = LibraryIndex.open(tmp_path / "lib")
    assert [(h.slide_fingerprint, h.tile) for h in again.search(queries[0], 20)] == found[0][:20]
    # Shrinking below the threshold makes it exact again.
    lib.remove([big_stores[0]])
    assert lib.kind == "flat" and len(lib) == 9216
    gone = EmbeddingStore.open(big_stores[0]).attrs["slide_fingerprint"]
    assert all(h.slide_fingerprint != gone for h in lib.search(queries[0], 200))


# ---------------------------------------------------------------------- changing
def test_add_remove_and_refresh(tmp_path, corpus, gen):
    s0, s1, s2 = corpus["stores"]
    lib = LibraryIndex.build([s0, s1], tmp_path / "lib")
    assert len(lib) == 2048
    done = lib.add([s2])
    assert done == {"added": [str(EmbeddingStore.open(s2).attrs["slide_path"])], "replaced": []}
    assert len(lib) == 3072 and len(LibraryIndex.open(tmp_path / "lib")) == 3072
    q = gen.queries(1)[0]
    assert_same_ranking(lib.search(q, 30), [s0, s1, s2], q, 30)
    # Adding a slide again replaces it (no duplicates).
    assert lib.add([s2])["replaced"] and len(lib) == 3072
    # Remove by file name, then by fingerprint prefix.
    fp1 = EmbeddingStore.open(s1).attrs["slide_fingerprint"]
    assert lib.remove(["slide0.tif"]) == [str(corpus["slides"][0].resolve())]
    lib.remove([fp1[:10]])
    assert_same_ranking(lib.search(q, 30), [s2], q, 30)
    assert len(LibraryIndex.open(tmp_path / "lib")) == 1024
    # Only the current generation and the remaining slide stay on disk.
    assert len(list((tmp_path / "lib").glob("gen-*"))) == 1
    assert len(list((tmp_path / "lib" / "slides").iterdir())) == 1
    with pytest.raises(ParameterError, match="no slide 'nope'"):
        lib.remove(["nope"])


def test_hnsw_removal_rebuilds_the_graph(tmp_path, corpus, gen):
    lib = LibraryIndex.build(corpus["stores"], tmp_path / "lib", kind="hnsw")
    assert lib.kind == "hnsw" and lib.engine.config.tuned_recall >= 0.95
    lib.remove([corpus["stores"][0]])
    assert len(lib) == 2048 and lib.kind == "hnsw"
    q = gen.queries(1)[0]
    want, _ = brute_force(corpus["stores"][1:], q, 50)
    got = [(h.slide_fingerprint, h.tile) for h in lib.search(q, 50)]
    assert len(set(got) & set(want)) >= 48
    lib.add([corpus["stores"][0]])  # adding needs no rebuild
    want, _ = brute_force(corpus["stores"], q, 50)
    got = [(h.slide_fingerprint, h.tile) for h in lib.search(q, 50)]
    assert len(lib) == 3072 and len(set(got) & set(want)) >= 48


def test_mixed_encoders_and_tilings_are_refused(tmp_path, corpus, gen):
    other_weights = make_store(tmp_path / "w.zarr", corpus["slides"][0],
                               lambda n: gen.chunk(0, n), meta=encoder_meta(sha="cd" * 32))
    other_tiling = make_store(tmp_path / "t.zarr", corpus["slides"][0],
                              lambda n: gen.chunk(0, n),
                              spec=TilingSpec(mpp=1.0, read_size=32, model_size=32,
                                              min_tissue=0.0))
    for bad, what in ((other_weights.path, "weights"), (other_tiling.path, "tiling")):
        with pytest.raises(StoreError, match=what) as err:
            LibraryIndex.build([corpus["stores"][1], bad], tmp_path / f"lib-{what}")
        assert "\n" not in str(err.value) and "separate library" in str(err.value)
    lib = LibraryIndex.build(corpus["stores"][1:], tmp_path / "lib")
    with pytest.raises(StoreError, match="weights"):
        lib.add([other_weights.path])
    with pytest.raises(StoreError, match="weights"):
        lib.query_from_store(other_weights.path, (0, 0, 500, 500))
    assert len(LibraryIndex.open(tmp_path / "lib")) == 2048  # unchanged


def test_build_refusals(tmp_path, corpus):
    with pytest.raises(StoreError, match="same slide"):
        twin = tmp_path / "twin.zarr"
        shutil.copytree(corpus["stores"][0], twin)
        LibraryIndex.build([corpus["stores"][0], twin], tmp_path / "lib")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParameterError, match="no embedding stores"):
        LibraryIndex.build([tmp_path / "empty"], tmp_path / "lib2")
    LibraryIndex.build(corpus["stores"][:1], tmp_path / "lib3")
    with pytest.raises(ParameterError, match="already holds a library"):
        LibraryIndex.build(corpus["stores"][:1], tmp_path / "lib3")
    assert len(LibraryIndex.build(corpus["stores"][1:], tmp_path / "lib3", overwrite=True)) == 2048
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "keep.txt").write_text("mine")
    with pytest.raises(ParameterError, match="not a library"):
        LibraryIndex.build(corpus["stores"][:1], tmp_path / "junk")
    incomplete = tmp_path / "half.zarr"
    with open_slide(corpus["slides"][0]) as slide:
        EmbeddingStore.create(incomplete, slide=slide, grid=make_grid(slide, SPEC),
                              encoder_meta=encoder_meta())
    with pytest.raises(StoreError, match="incomplete"):
        LibraryIndex.build([incomplete], tmp_path / "lib4")


# ---------------------------------------------------------------------- damage and staleness
def _copy(lib: LibraryIndex, dest):
    shutil.copytree(lib.path, dest)
    return dest


def test_corrupted_libraries_are_reported(tmp_path, flat_lib):
    meta = json.loads((flat_lib.path / "meta.json").read_text())

    trunc = _copy(flat_lib, tmp_path / "trunc")
    index = trunc / meta["files"]["index"]["path"]
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    with pytest.raises(IndexError_, match="truncated"):
        LibraryIndex.open(trunc)

    garbage = _copy(flat_lib, tmp_path / "garbage")
    index = garbage / meta["files"]["index"]["path"]
    index.write_bytes(b"\0" * index.stat().st_size)
    with pytest.raises(IndexError_, match="corrupted"):
        LibraryIndex.open(garbage, mmap=False)

    bad_json = _copy(flat_lib, tmp_path / "badjson")
    (bad_json / "meta.json").write_text("{not json")
    with pytest.raises(IndexError_, match="corrupted"):
        LibraryIndex.open(bad_json)

    no_keys = _copy(flat_lib, tmp_path / "nokeys")
    broken = dict(meta)
    del broken["slides"]
    (no_keys / "meta.json").write_text(json.dumps(broken))
    with pytest.raises(IndexError_, match="missing slides"):
        LibraryIndex.open(no_keys)

    rows = _copy(flat_lib, tmp_path / "rows")
    (rows / meta["files"]["rows"]["path"]).unlink()
    with pytest.raises(IndexError_, match="missing"):
        LibraryIndex.open(rows)

    coords = _copy(flat_lib, tmp_path / "coords")
    first = coords / meta["slides"][0]["files"]["coords"]["path"]
    first.write_bytes(first.read_bytes()[:-100])
    with pytest.raises(IndexError_, match="tile coordinates"):
        LibraryIndex.open(coords).search(np.ones(D, np.float32), top_k=len(flat_lib))

    with pytest.raises(IndexError_, match="no library"):
        LibraryIndex.open(tmp_path / "nowhere")
    for err in ("trunc", "badjson", "nokeys", "rows"):
        with pytest.raises(IndexError_) as info:
            LibraryIndex.open(tmp_path / err)
        assert "\n" not in str(info.value)


def test_stale_store_and_missing_slide(tmp_path, corpus, gen):
    slide = tmp_path / "moved.tif"
    shutil.copy(corpus["slides"][2], slide)
    store = make_store(tmp_path / "moved.zarr", slide, lambda n: gen.chunk(5000, 5000 + n))
    lib = LibraryIndex.build([store.path, corpus["stores"][0]], tmp_path / "lib")
    LibraryIndex.open(lib.path)  # fresh: verifies fine

    rerun = EmbeddingStore.open(store.path, mode="r+")  # as a rerun of `gpfm embed` would
    rerun.write(np.arange(10), gen.chunk(9000, 9010))
    rerun.finalize()
    with pytest.raises(IndexError_, match="changed since it was added") as err:
        LibraryIndex.open(lib.path)
    assert f"gpfm index add {lib.path} {store.path}" in str(err.value)
    assert "\n" not in str(err.value)
    LibraryIndex.open(lib.path, verify=False).search(np.ones(D, np.float32))  # still usable
    lib.add([store.path])  # refresh
    LibraryIndex.open(lib.path)

    slide.unlink()
    with pytest.raises(IndexError_, match="moved.tif .* is missing") as err:
        LibraryIndex.open(lib.path)
    assert "gpfm index remove" in str(err.value)
    statuses = {s["status"] for s in lib.info()["slides"]}
    assert statuses == {"ok", "slide missing"}
    lib.remove([str(slide)])  # the fix the message names
    LibraryIndex.open(lib.path)


def test_deleted_store_is_not_stale(tmp_path, corpus, gen):
    store = make_store(tmp_path / "gone.zarr", corpus["slides"][1],
                       lambda n: gen.chunk(0, n))
    lib = LibraryIndex.build([store.path], tmp_path / "lib")
    shutil.rmtree(store.path)
    again = LibraryIndex.open(lib.path)
    assert again.info()["slides"][0]["status"] == "store missing"
    assert len(again.search(gen.queries(1)[0], 5)) == 5


def test_leftovers_of_a_killed_writer_are_ignored_then_cleaned(tmp_path, corpus, gen):
    lib = LibraryIndex.build(corpus["stores"][:2], tmp_path / "lib")
    q = gen.queries(1)[0]
    before = [(h.slide_fingerprint, h.tile) for h in lib.search(q, 20)]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (lib.path / ".lock").write_text(f"{dead.pid}@{os.uname().nodename}")
    (lib.path / "gen-000099").mkdir()
    (lib.path / "gen-000099" / "index.faiss").write_bytes(b"half")
    (lib.path / "slides" / "000099").mkdir()
    (lib.path / ".meta.json.123.partial").write_text("{")
    reader = LibraryIndex.open(lib.path)
    assert [(h.slide_fingerprint, h.tile) for h in reader.search(q, 20)] == before
    reader.add([corpus["stores"][2]])  # takes over the dead writer's lock
    names = sorted(p.name for p in lib.path.iterdir())
    assert names == ["gen-000002", "meta.json", "slides"]
    assert sorted(p.name for p in (lib.path / "slides").iterdir()) == [
        "000001", "000002", "000003"]


def test_a_live_writer_blocks_another(tmp_path, corpus):
    lib = LibraryIndex.build(corpus["stores"][:1], tmp_path / "lib")
    (lib.path / ".lock").write_text(f"{os.getpid()}@{os.uname().nodename}")
    with pytest.raises(IndexError_, match="being changed by another process"):
        lib.add([corpus["stores"][1]])
    (lib.path / ".lock").unlink()


def test_importing_the_library_package_stays_light():
    code = ("import sys, napari_gpfm.library as L; "
            "assert 'faiss' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_failure_mid_way_leaves_nothing_behind(tmp_path, corpus):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(corpus["stores"][2], damaged)
    for chunk in (damaged / "features" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not zstd" * 10)
    with pytest.raises(StoreError, match="corrupted"):
        LibraryIndex.build([corpus["stores"][0], damaged], tmp_path / "new")
    assert not (tmp_path / "new").exists()  # the first store's copy went with it
    lib = LibraryIndex.build(corpus["stores"][:1], tmp_path / "lib")
    before = sorted(p.relative_to(lib.path) for p in lib.path.rglob("*"))
    with pytest.raises(StoreError, match="corrupted"):
        lib.add([corpus["stores"][1], damaged])
    assert sorted(p.relative_to(lib.path) for p in lib.path.rglob("*")) == before
    assert len(LibraryIndex.open(lib.path)) == 1024
