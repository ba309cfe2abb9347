"""Exact library search on a GPU: top-100 over N x 1024 float16 vectors with torch matmul.

For a lent GPU (under a minute on an H100/H200 at 10M). ``bench_search.py --gpu`` measures the
same thing beside the CPU engines but first generates the vectors and their exact top-100 on
the CPU (tens of minutes at 10M); this script draws vectors from the same cluster mixture as
``napari_gpfm.library.synthetic.ClusteredEmbeddings`` (its centres, directions and scales)
directly on the device, so the GPU's minutes go to the search alone. Ground truth: the same
top-100 computed in float32. Reported: per-query latency (one query at a time, p50 / p95) and
per-query cost in batches of 64, recall@100 of the float16 search, device memory. No faiss
needed::

    python bench/search_gpu.py --n 10000000 --out results.md
    python bench/search_gpu.py --smoke          # 50k vectors on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

K = 100


def mixture_on_device(n: int, dim: int, seed: int, device, dtype, chunk: int = 1 << 20):
    """``n`` unit vectors of ClusteredEmbeddings' mixture, made on ``device`` in ``dtype``."""
    import torch

    from napari_gpfm.library.synthetic import ClusteredEmbeddings

    gen = ClusteredEmbeddings(dim, n_clusters=max(50, min(5000, n // 2000)), seed=seed)
    # The mixture's parameters (numpy) moved to the device; rows are drawn there.
    centres = torch.from_numpy(gen._centres).to(device)
    basis = torch.from_numpy(gen._basis[gen._within_rotation]).to(device)
    scale = torch.from_numpy(gen._within_scale).to(device)
    weights = torch.from_numpy(gen._weights).to(device, torch.float32)
    g = torch.Generator(device=device).manual_seed(seed)
    table = torch.empty((n, dim), dtype=dtype, device=device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        labels = torch.multinomial(weights, size, replacement=True, generator=g)
        rows = centres[labels]
        rows += (torch.randn((size, len(scale)), device=device, generator=g) * scale) @ basis
        rows += torch.randn((size, dim), device=device, generator=g) * (0.25 / dim**0.5)
        table[start:start + size] = torch.nn.functional.normalize(rows, dim=1).to(dtype)
    queries = torch.from_numpy(gen.queries(64)).to(device)
    return table, queries


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=50, help="single queries timed")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="append the Markdown table here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.n, args.repeats = 50_000, 5
    elif not cuda:
        print("no CUDA device: use --smoke on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32  # no fast fp16 matmul on the CPU

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    table, queries = mixture_on_device(args.n, args.dim, args.seed, device, dtype)
    sync()
    made_s = time.perf_counter() - t0
    # Ground truth in float32, in chunks (a float32 copy of the table would double memory).
    best_s = torch.full((len(queries), K), -2.0, device=device)
    best_i = torch.zeros((len(queries), K), dtype=torch.long, device=device)
    for start in range(0, args.n, 1 << 21):
        block = table[start:start + (1 << 21)].float()
        s, i = torch.topk(queries @ block.T, min(K, len(block)), dim=1)
        merged_s = torch.cat([best_s, s], 1)
        merged_i = torch.cat([best_i, i + start], 1)
        best_s, pos = torch.topk(merged_s, K, dim=1)
        best_i = torch.gather(merged_i, 1, pos)
    truth = best_i.cpu()
    q = queries.to(dtype)

    def search(qs):
        scores, ids = torch.topk(qs @ table.T, K, dim=1)
        sync()
        return ids

    for _ in range(3):
        search(q[:1])
    singles = []
    found = []
    for r in range(args.repeats):
        t = time.perf_counter()
        ids = search(q[r % len(q): r % len(q) + 1])
        singles.append((time.perf_counter() - t) * 1e3)
        found.append(ids.cpu())
    t = time.perf_counter()
    batch_ids = search(q)
    batch_ms = (time.perf_counter() - t) * 1e3
    recall = sum(len(set(batch_ids[j].tolist()) & set(truth[j].tolist()))
                 for j in range(len(q))) / (K * len(q))
    singles.sort()
    p50, p95 = singles[len(singles) // 2], singles[int(0.95 * (len(singles) - 1))]
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    line = (f"| {name} | {args.n:,} x {args.dim} {str(dtype).split('.')[1]} | torch {torch.__version__} matmul + topk | "
            f"{p50:.1f} / {p95:.1f} ms | {batch_ms / len(q):.2f} ms | {recall:.4f} | "
            f"{mem:.1f} GiB | {made_s:.0f} s |")
    header = ("| device | vectors | method | single query p50 / p95 | per query, batch of 64 "
              "| recall@100 vs fp32 | peak device memory | generation |\n"
              "|---|---|---|---|---|---|---|---|")
    print(header)
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(header + "\n" + line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
