"""GPU check of the embedding engine: GPFM ViT-L/14 throughput, model-only and end-to-end.

For a lent GPU (about 5 minutes on an H100; ``--budget-s`` skips the optional steps that no
longer fit). Weights are random (built on the device): speed does not depend on their values.

1. model-only: the engine's compute step (uint8 tiles in pinned host memory -> device ->
   resize 256 -> 224 + normalise on the device -> bf16 autocast forward -> CLS back to the
   host) for batch sizes 32..512, eager; then ``torch.compile`` (inductor) at ``--compile-batch``;
2. reading alone: ``TileLoader`` over the grid of a large synthetic Aperio-like slide (0.499
   um/px, 240 px JPEG tiles cut from the real H&E sample), to show what the CPU side can feed;
3. end-to-end: ``embed_slide`` (loader threads -> model -> zarr store) on that slide, eager and,
   if time remains, compiled; the ratio to model-only at the same batch size (goal >= 90%).

Prints the card name and a Markdown table (also written to ``--out``)::

    python bench/gpu.py --out results.md
    python bench/gpu.py --smoke          # tiny sizes on the CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_embed import (  # noqa: E402  (the bench folder is not a package)
    end_to_end_rate,
    machine_info,
    model_only_rate,
    random_encoder,
    synthetic_slide,
)


class Budget:
    """Seconds left of the run's allowance."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def loader_rate(slide_path: Path, *, mpp: float, read_size: int, model_size: int,
                batch_size: int, workers: int, limit: int | None) -> tuple[float, int]:
    """Tiles/s of TileLoader alone over the slide's tissue grid (first ``limit`` tiles)."""
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TileLoader, TilingSpec, make_grid

    with open_slide(slide_path) as slide:
        grid = make_grid(slide, TilingSpec(mpp=mpp, read_size=read_size, model_size=model_size))
        stop = len(grid) if limit is None else min(limit, len(grid))
        t0 = time.perf_counter()
        n = 0
        with TileLoader(slide, grid, batch_size=batch_size, num_workers=workers,
                        stop=stop) as loader:
            for batch in loader:
                n += len(batch)
        return n / (time.perf_counter() - t0), n


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model and sizes, CPU allowed: checks that the script runs")
    p.add_argument("--batches", default="32,64,128,256,512")
    p.add_argument("--compile-batch", type=int, default=256)
    p.add_argument("--e2e-batch", type=int, default=256)
    p.add_argument("--slide-px", type=int, default=30000, help="synthetic slide side (px)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader threads (default: cores - 2)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per model-only point")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip optional steps (compile, compiled end-to-end) past this")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    elif args.smoke:
        device = torch.device("cpu")
    else:
        print("error: no CUDA GPU here; run with --smoke for a CPU check of the script",
              file=sys.stderr)
        return 2
    info = machine_info(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(f"device: {card}", flush=True)

    if args.smoke:
        model_name, batches, compile_backend = "timm:test_vit", [4, 8], "eager"
        args.compile_batch, args.e2e_batch = 8, 8
        args.slide_px, args.seconds, e2e_limit = 2048, 0.5, 48
    else:
        model_name, compile_backend = "gpfm", True
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        e2e_limit = None
    workers = args.workers or max(2, (os.cpu_count() or 4) - 2)
    mpp, read_size = 0.5, None

    t0 = time.perf_counter()
    encoder = random_encoder(model_name, device)
    read_size = encoder.spec.native_read_size
    model_size = encoder.spec.input_size
    prec = "bf16" if device.type == "cuda" else "fp32"
    print(f"built {model_name} with random weights in {time.perf_counter() - t0:.1f} s",
          flush=True)

    rows: list[str] = []
    eager: dict[int, float] = {}
    compiled: dict[int, float] = {}
    for bs in batches:
        try:
            rate = model_only_rate(encoder, device, batch_size=bs, read_size=read_size,
                                   seconds=args.seconds)
        except Exception as exc:  # e.g. out of memory at the largest batch: report, go on
            rows.append(f"| model-only | eager | {bs} | failed: {type(exc).__name__} | | |")
            continue
        eager[bs] = rate
        print(f"model-only eager   batch {bs:4d}: {rate:8.1f} tiles/s", flush=True)
        rows.append(f"| model-only | eager | {bs} | {rate:.1f} | | |")
    if budget.left() > 150 or args.smoke:
        t1 = time.perf_counter()
        rate = model_only_rate(encoder, device, batch_size=args.compile_batch,
                               read_size=read_size, compile=compile_backend,
                               seconds=args.seconds, warmup=2)
        compiled[args.compile_batch] = rate
        took = time.perf_counter() - t1
        print(f"model-only compile batch {args.compile_batch:4d}: {rate:8.1f} tiles/s "
              f"(compile + timing {took:.0f} s)", flush=True)
        rows.append(f"| model-only | compiled | {args.compile_batch} | {rate:.1f} | | "
                    f"compile + timing {took:.0f} s |")
    else:
        rows.append("| model-only | compiled | - | skipped (time budget) | | |")

    with tempfile.TemporaryDirectory(prefix="gpfm-gpu-") as tmp:
        work = Path(tmp)
        t1 = time.perf_counter()
        slide = synthetic_slide(work, args.slide_px)
        print(f"synthetic slide {args.slide_px} px written in {time.perf_counter() - t1:.0f} s",
              flush=True)
        lrate, ltiles = loader_rate(slide, mpp=mpp, read_size=read_size,
                                    model_size=model_size, batch_size=args.e2e_batch,
                                    workers=workers, limit=e2e_limit)
        print(f"reading alone ({workers} threads): {lrate:8.1f} tiles/s over {ltiles} tiles",
              flush=True)
        rows.append(f"| reading alone (TileLoader, {workers} threads) | - | {args.e2e_batch} | "
                    f"{lrate:.1f} | | {ltiles} tiles |")
        ref = eager.get(args.e2e_batch)
        # First use of the store writer, the decoders and the loader threads costs once.
        end_to_end_rate(encoder, device, slide, batch_size=args.e2e_batch, workers=workers,
                        mpp=mpp, read_size=read_size, limit=2 * args.e2e_batch, workdir=work)
        e2e = end_to_end_rate(encoder, device, slide, batch_size=args.e2e_batch,
                              workers=workers, mpp=mpp, read_size=read_size, limit=e2e_limit,
                              workdir=work)
        ratio = f"{100 * e2e.rate / ref:.0f}%" if ref else "-"
        print(f"end-to-end eager   batch {args.e2e_batch:4d}: {e2e.rate:8.1f} tiles/s "
              f"({e2e.tiles} tiles, {ratio} of model-only)", flush=True)
        rows.append(f"| end-to-end ({workers} loader threads) | eager | {args.e2e_batch} | "
                    f"{e2e.rate:.1f} | {ratio} | {e2e.tiles} tiles, {e2e.seconds:.1f} s |")
        if budget.left() > 120 or args.smoke:
            e2c = end_to_end_rate(encoder, device, slide, batch_size=args.e2e_batch,
                                  workers=workers, mpp=mpp, read_size=read_size,
                                  compile=compile_backend, limit=e2e_limit, workdir=work)
            cref = compiled.get(args.e2e_batch)
            cratio = f"{100 * e2c.rate / cref:.0f}%" if cref else "-"
            print(f"end-to-end compile batch {args.e2e_batch:4d}: {e2c.rate:8.1f} tiles/s "
                  f"(includes compiling)", flush=True)
            rows.append(f"| end-to-end ({workers} loader threads) | compiled | "
                        f"{args.e2e_batch} | {e2c.rate:.1f} | {cratio} | {e2c.tiles} tiles, "
                        f"{e2c.seconds:.1f} s including compilation |")
        else:
            rows.append("| end-to-end | compiled | - | skipped (time budget) | | |")

    header = [
        f"### {card}: {model_name} ({read_size} px tiles at {mpp} um/px -> {model_size}), {prec}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB RAM; "
        f"{info['accelerator'] or 'no GPU'}; torch {info['torch']}. Random weights. "
        f"Slide: synthetic {args.slide_px} x {args.slide_px} px at 0.499 um/px, 240 px JPEG "
        "tiles (Aperio-like, tiles resampled). Total script time "
        f"{args.budget_s - budget.left():.0f} s.",
        "",
        "| what | mode | batch | tiles/s | end-to-end / model-only | notes |",
        "|---|---|---|---|---|---|",
    ]
    report = "\n".join(header + rows) + "\n"
    print()
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
