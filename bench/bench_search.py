"""Library search at scale: latency, recall@100 and memory of the library's vector engine.

Builds the engine the library uses for large libraries (``ivfpq``: PCA-128, IVF, 4-bit PQ
fast-scan, exact re-ranking from float16 vectors; see ``napari_gpfm/library/engine.py``) over
N synthetic 1024-d tile embeddings (a seeded cluster mixture, ``ClusteredEmbeddings``), and
measures top-100 search against exact search.

Streaming, so 10M x 1024 (20 GB in float16) fits a 24 GiB machine: vectors are generated in
chunks, written to a float16 memmap under ``bench/.cache/`` (the re-ranking source, as the
library's per-slide float16 copies are), and the exact top-100 of the evaluation and tuning
queries is accumulated chunk by chunk on the way. The engine is trained on a sample, filled
chunk by chunk, tuned on *tuning* queries (as the library tunes on its own vectors) and
evaluated on separate queries in a fresh process, so the RSS reported is the search process's.
Generated data, ground truth and the built index are cached and reused by later runs.

Usage::

    python bench/bench_search.py --n 1000000                    # 1M x 1024 on the CPU
    python bench/bench_search.py --n 10000000 --max-minutes 20  # stops cleanly at the cap
    python bench/bench_search.py --smoke                        # seconds: every code path
    python bench/bench_search.py --n 10000000 --gpu             # + torch / faiss-gpu on CUDA

``--gpu`` adds exact search on the accelerator: torch matmul + topk over the float16 vectors
(resident on the device), and faiss ``GpuIndexFlatIP`` (float16 storage) if faiss-gpu is
installed. With ``--smoke`` and no CUDA, the torch path runs on the CPU so it stays tested.
Results: one JSON line per run in ``bench/.cache/search-results.jsonl`` and a Markdown table
on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from napari_gpfm.library.engine import (  # noqa: E402
    EngineConfig,
    VectorEngine,
    advise_random,
    exact_top_k,
    recall_at_k,
)
from napari_gpfm.library.synthetic import ClusteredEmbeddings  # noqa: E402

CACHE = REPO / "bench" / ".cache"
CHUNK = 1 << 17
K = 100


# ---------------------------------------------------------------------- machine
def machine() -> dict:
    import faiss
    from _machine import cpu_name, ram_gib

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "ram_gib": round(ram_gib() or 0.0, 1),
            "faiss": faiss.__version__, "numpy": np.__version__,
            "load_avg": [round(v, 2) for v in os.getloadavg()]}


def rss_mib(kind: str = "VmRSS") -> float:
    """Resident memory: ``VmRSS`` (all), ``RssAnon`` (private), ``RssFile`` (mapped files,
    i.e. page cache of the index and the memmap, reclaimable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Budget:
    """Wall-clock cap over a whole run; ``check`` raises once it is spent."""

    def __init__(self, minutes: float):
        self.start = time.perf_counter()
        self.limit = minutes * 60

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self, what: str, done: int, total: int) -> None:
        spent = self.elapsed()
        if spent > self.limit:
            rate = done / max(spent, 1e-9)
            raise TimeoutError(
                f"time cap reached during {what} after {spent / 60:.1f} min at {done}/{total} "
                f"rows ({rate:.0f} rows/s)"
            )


# ---------------------------------------------------------------------- data + ground truth
def data_dir(n: int, dim: int, seed: int) -> Path:
    return CACHE / f"search-{n}x{dim}-s{seed}"


def prepare(n: int, dim: int, seed: int, n_eval: int, n_tune: int, budget: Budget,
            log) -> dict:
    """Generate the vectors (float16 memmap) and the exact top-K of eval + tuning queries."""
    folder = data_dir(n, dim, seed)
    done = folder / "data.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("n_eval") == n_eval and info.get("n_tune") == n_tune:
            log(f"reusing cached vectors and ground truth in {folder}")
            return info
    folder.mkdir(parents=True, exist_ok=True)
    gen = ClusteredEmbeddings(dim, n_clusters=max(50, min(5000, n // 2000)), seed=seed)
    queries = gen.queries(n_eval + n_tune)
    vectors = np.lib.format.open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float16,
                                        shape=(n, dim))
    t0 = time.perf_counter()

    def chunks():
        for start, rows in gen.iter_chunks(n, CHUNK):
            half = rows.astype(np.float16)
            vectors[start: start + len(half)] = half
            yield np.arange(start, start + len(half), dtype=np.int64), half
            if start // CHUNK % 8 == 0:
                log(f"  generated {start + len(half)}/{n} ({time.perf_counter() - t0:.0f} s)")
            budget.check("generation", start + len(half), n)

    scores, ids = exact_top_k(queries, chunks(), K)
    vectors.flush()
    seconds = time.perf_counter() - t0
    np.savez(folder / "truth.npz", queries=queries, ids=ids, scores=scores)
    info = {"n": n, "dim": dim, "seed": seed, "n_eval": n_eval, "n_tune": n_tune,
            "generate_and_truth_s": round(seconds, 1),
            "vectors_bytes": (folder / "vectors.npy").stat().st_size}
    done.write_text(json.dumps(info))
    return info


def load_truth(folder: Path, n_eval: int):
    t = np.load(folder / "truth.npz")
    q, ids = t["queries"], t["ids"]
    return (q[:n_eval], ids[:n_eval]), (q[n_eval:], ids[n_eval:])


# ---------------------------------------------------------------------- build
def retune_index(folder: Path, info: dict, n_eval: int, log) -> dict:
    """Tune a cached index again (after a change to the tuning rules)."""
    config = EngineConfig.from_dict(info["config"])
    engine = VectorEngine.load(folder / "index.faiss", config, mmap=True)
    vectors = advise_random(np.load(folder / "vectors.npy", mmap_mode="r"))
    _, (tune_q, tune_truth) = load_truth(folder, n_eval)
    t0 = time.perf_counter()
    tuned = engine.tune(tune_q, tune_truth, lambda ids: vectors[ids])
    log(f"  re-tuned in {time.perf_counter() - t0:.0f} s: {config.describe()}")
    return {"config": config.to_dict(), "tune_recall": round(tuned, 4)}


def build(n: int, dim: int, seed: int, n_eval: int, budget: Budget, log,
          retune: bool = False) -> dict:
    folder = data_dir(n, dim, seed)
    built = folder / "built.json"
    if built.is_file() and (folder / "index.faiss").is_file():
        info = json.loads(built.read_text())
        log(f"reusing the built index in {folder}")
        if retune:
            info.update(retune_index(folder, info, n_eval, log))
            built.write_text(json.dumps(info))
        return info
    vectors = advise_random(np.load(folder / "vectors.npy", mmap_mode="r"))
    _, (tune_q, tune_truth) = load_truth(folder, n_eval)
    config = EngineConfig.plan("ivfpq", n, dim)
    size = VectorEngine.training_size(config, n)
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, size=size, replace=False))
    t0 = time.perf_counter()
    sample = np.asarray(vectors[rows], dtype=np.float32)
    engine = VectorEngine.create(config, sample)
    del sample
    train_s = time.perf_counter() - t0
    log(f"  trained {config.factory} on {size} vectors in {train_s:.0f} s")
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        engine.add(np.asarray(vectors[start:stop], dtype=np.float32),
                   np.arange(start, stop, dtype=np.int64))
        if start // CHUNK % 8 == 0:
            log(f"  added {stop}/{n} ({time.perf_counter() - t0:.0f} s)")
        budget.check("adding", stop, n)
    add_s = time.perf_counter() - t0

    def fetch(ids):
        return vectors[ids]

    t0 = time.perf_counter()
    tuned = engine.tune(tune_q, tune_truth, fetch)
    tune_s = time.perf_counter() - t0
    log(f"  tuned in {tune_s:.0f} s: {config.describe()}")
    engine.save(folder / "index.faiss")
    info = {"config": config.to_dict(), "train_s": round(train_s, 1), "add_s": round(add_s, 1),
            "add_rate": round(n / add_s), "tune_s": round(tune_s, 1),
            "tune_recall": round(tuned, 4), "index_bytes": (folder / "index.faiss").stat().st_size,
            "build_rss_peak_mib": round(peak_rss_mib())}
    built.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------- search (own process)
def _latencies(search, queries: np.ndarray) -> dict:
    search(queries[:1])  # first touch: page in the lists and the index header
    singles = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        search(queries[i: i + 1])
        singles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, found = search(queries)
    batch = time.perf_counter() - t0
    return {"single_ms_median": round(1e3 * float(np.median(singles)), 2),
            "single_ms_p90": round(1e3 * float(np.percentile(singles, 90)), 2),
            "batch_ms": round(1e3 * batch, 1), "batch_queries": int(len(queries)),
            "found": found}


def search_phase(n: int, dim: int, seed: int, n_eval: int, exact_flat: bool) -> dict:
    folder = data_dir(n, dim, seed)
    (queries, truth), _ = load_truth(folder, n_eval)
    config = EngineConfig.from_dict(json.loads((folder / "built.json").read_text())["config"])
    rss0 = rss_mib()
    engine = VectorEngine.load(folder / "index.faiss", config, mmap=True)
    vectors = advise_random(np.load(folder / "vectors.npy", mmap_mode="r"))
    rss_loaded = rss_mib()

    def fetch(ids):
        return vectors[ids]

    lat = _latencies(lambda q: engine.search(q, K, fetch), queries)
    out = {"ivfpq": {k: v for k, v in lat.items() if k != "found"}}
    out["ivfpq"]["recall_at_100"] = round(recall_at_k(lat["found"], truth), 4)
    out["rss_mib_before_load"] = round(rss0)
    out["rss_mib_after_load"] = round(rss_loaded)
    out["rss_mib_after_search"] = round(rss_mib())
    out["rss_anon_mib_after_search"] = round(rss_mib("RssAnon"))
    out["rss_file_mib_after_search"] = round(rss_mib("RssFile"))
    if exact_flat:
        out["flat"] = flat_exact(vectors, queries, truth)
    return out


def flat_exact(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    """The library's exact kind (IndexFlatIP, float32 in RAM) on the same vectors."""
    config = EngineConfig.plan("flat", len(vectors), vectors.shape[1])
    engine = VectorEngine.create(config)
    t0 = time.perf_counter()
    for start in range(0, len(vectors), CHUNK):
        stop = min(len(vectors), start + CHUNK)
        engine.add(np.asarray(vectors[start:stop], dtype=np.float32),
                   np.arange(start, stop, dtype=np.int64))
    add_s = time.perf_counter() - t0
    lat = _latencies(lambda q: engine.search(q, K), queries)
    res = {k: v for k, v in lat.items() if k != "found"}
    res["recall_at_100"] = round(recall_at_k(lat["found"], truth), 4)
    res["add_s"] = round(add_s, 1)
    res["rss_mib"] = round(rss_mib())
    return res


# ---------------------------------------------------------------------- GPU
def gpu_phase(n: int, dim: int, seed: int, n_eval: int, smoke: bool) -> dict:
    import torch

    folder = data_dir(n, dim, seed)
    (queries, truth), _ = load_truth(folder, n_eval)
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        return {"skipped": "no CUDA device"}
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32  # CPU matmul has no fast fp16 path

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    state = {"table": torch.empty((n, dim), dtype=dtype, device=device)}
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        state["table"][start:stop] = torch.from_numpy(
            np.ascontiguousarray(vectors[start:stop])).to(device, dtype)
    sync()
    upload_s = time.perf_counter() - t0
    q_all = torch.from_numpy(queries).to(device, dtype)

    def search(q):
        qt = q_all[: len(q)] if len(q) == len(q_all) else torch.from_numpy(q).to(device, dtype)
        scores, ids = torch.topk(qt @ state["table"].T, K, dim=1)
        sync()
        return scores, ids.cpu().numpy()

    lat = _latencies(search, queries)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
           "torch": torch.__version__, "upload_s": round(upload_s, 1)}
    out["torch_matmul"] = {k: v for k, v in lat.items() if k != "found"}
    out["torch_matmul"]["recall_at_100"] = round(recall_at_k(lat["found"], truth), 4)
    if cuda:
        out["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    state.clear()  # free the device copy before faiss-gpu makes its own
    if cuda:
        torch.cuda.empty_cache()
    out["faiss_gpu"] = faiss_gpu(vectors, queries, truth)
    return out


def faiss_gpu(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return {"skipped": "faiss-gpu not installed or no GPU"}
    res = faiss.StandardGpuResources()
    cfg = faiss.GpuIndexFlatConfig()
    cfg.useFloat16 = True
    index = faiss.GpuIndexFlatIP(res, vectors.shape[1], cfg)
    t0 = time.perf_counter()
    for start in range(0, len(vectors), CHUNK):
        index.add(np.asarray(vectors[start: start + CHUNK], dtype=np.float32))
    add_s = time.perf_counter() - t0
    lat = _latencies(lambda q: index.search(np.ascontiguousarray(q, np.float32), K), queries)
    out = {k: v for k, v in lat.items() if k != "found"}
    out["recall_at_100"] = round(recall_at_k(lat["found"], truth), 4)
    out["add_s"] = round(add_s, 1)
    return out


# ---------------------------------------------------------------------- report
def markdown_rows(result: dict) -> list[str]:
    n = result["n"]
    built = result["build"]
    s = result["search"]
    cfg = built["config"]
    rows = []
    iv = s["ivfpq"]
    rows.append(
        f"| {n:,} x {result['dim']} | ivfpq `{EngineConfig(**cfg).factory}` nprobe "
        f"{cfg['nprobe']}, re-rank {cfg['shortlist']} | {iv['recall_at_100']:.3f} | "
        f"{iv['single_ms_median']:.1f} (p90 {iv['single_ms_p90']:.1f}) | "
        f"{iv['batch_ms'] / iv['batch_queries']:.1f} | {built['index_bytes'] / 2**20:.0f} MiB "
        f"+ {result['data']['vectors_bytes'] / 2**30:.1f} GiB fp16 memmap | "
        f"{s['rss_anon_mib_after_search']:.0f} + {s['rss_file_mib_after_search']:.0f} mapped | train {built['train_s']:.0f} s, add "
        f"{built['add_s']:.0f} s ({built['add_rate']:,}/s) |"
    )
    if "flat" in s:
        fl = s["flat"]
        rows.append(
            f"| {n:,} x {result['dim']} | flat (exact IndexFlatIP, fp32 in RAM) | "
            f"{fl['recall_at_100']:.3f} | {fl['single_ms_median']:.1f} (p90 "
            f"{fl['single_ms_p90']:.1f}) | {fl['batch_ms'] / fl['batch_queries']:.1f} | "
            f"{n * result['dim'] * 4 / 2**30:.1f} GiB | {fl['rss_mib']:.0f} | add "
            f"{fl['add_s']:.0f} s |"
        )
    g = result.get("gpu")
    if g and "torch_matmul" in g:
        tm = g["torch_matmul"]
        rows.append(
            f"| {n:,} x {result['dim']} | torch matmul+topk on {g['device']} | "
            f"{tm['recall_at_100']:.3f} | {tm['single_ms_median']:.2f} | "
            f"{tm['batch_ms'] / tm['batch_queries']:.2f} | {g.get('gpu_mem_gib', '-')} GiB | - | "
            f"upload {g['upload_s']:.0f} s |"
        )
        fg = g.get("faiss_gpu", {})
        if "recall_at_100" in fg:
            rows.append(
                f"| {n:,} x {result['dim']} | faiss GpuIndexFlatIP fp16 | "
                f"{fg['recall_at_100']:.3f} | {fg['single_ms_median']:.2f} | "
                f"{fg['batch_ms'] / fg['batch_queries']:.2f} | - | - | add {fg['add_s']:.0f} s |"
            )
    return rows


HEADER = ("| N x D | engine | recall@100 | 1 query, ms (median) | per query in a batch of "
          "20, ms | index / data size | search RSS, MiB (private + file pages) | build |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="library sizes")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=20, help="evaluation queries")
    p.add_argument("--tune-queries", type=int, default=64, help="tuning queries")
    p.add_argument("--max-minutes", type=float, default=20.0,
                   help="cap on each size's generation + build wall time")
    p.add_argument("--flat-max", type=int, default=2_000_000,
                   help="also time exact IndexFlatIP up to this N (float32 in RAM)")
    p.add_argument("--gpu", action="store_true", help="add the accelerator section")
    p.add_argument("--retune", action="store_true",
                   help="tune a cached index again before measuring")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (30k x 64) through every code path, in seconds")
    p.add_argument("--phase", choices=("all", "search", "gpu"), default="all",
                   help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help="cache folder (default bench/.cache)")
    args = p.parse_args(argv)
    global CACHE
    if args.cache:
        CACHE = Path(args.cache)
    if args.smoke:
        args.n, args.dim, args.queries, args.tune_queries = [30_000], 64, 5, 16
    if args.phase != "all":  # a child process measuring one phase
        n = args.n[0]
        if args.phase == "search":
            out = search_phase(n, args.dim, args.seed, args.queries, n <= args.flat_max)
        else:
            out = gpu_phase(n, args.dim, args.seed, args.queries, args.smoke)
        print(json.dumps(out))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    results = []
    for n in args.n:
        budget = Budget(args.max_minutes)
        log(f"== {n:,} x {args.dim}")
        result = {"n": n, "dim": args.dim, "machine": machine(),
                  "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            result["data"] = prepare(n, args.dim, args.seed, args.queries, args.tune_queries,
                                     budget, log)
            result["build"] = build(n, args.dim, args.seed, args.queries, budget, log,
                                    retune=args.retune)
        except TimeoutError as exc:
            result["stopped"] = str(exc)
            log(f"  {exc}")
            results.append(result)
            _record(result)
            continue
        child = [sys.executable, __file__, "--n", str(n), "--dim", str(args.dim), "--seed",
                 str(args.seed), "--queries", str(args.queries), "--flat-max",
                 str(args.flat_max)] + (["--cache", str(CACHE)] if args.cache else []) + (
                     ["--smoke"] if args.smoke else [])
        result["search"] = json.loads(subprocess.run(
            child + ["--phase", "search"], check=True, capture_output=True, text=True
        ).stdout.strip().splitlines()[-1])
        if args.gpu:
            result["gpu"] = json.loads(subprocess.run(
                child + ["--phase", "gpu"], check=True, capture_output=True, text=True
            ).stdout.strip().splitlines()[-1])
        result["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        results.append(result)
        _record(result)
    m = results[0]["machine"] if results else machine()
    print(f"CPU: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; faiss {m['faiss']}, "
          f"numpy {m['numpy']}; load average at start {m['load_avg']}")
    print()
    print(HEADER)
    for r in results:
        if "stopped" in r:
            print(f"| {r['n']:,} x {r['dim']} | not measured: {r['stopped']} | | | | | | |")
        else:
            print("\n".join(markdown_rows(r)))
    return 0


def _record(result: dict) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "search-results.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
