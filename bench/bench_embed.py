"""Embedding engine benchmark: model-only vs end-to-end tiles per second, same model, same run.

* model-only: random uint8 batches already in host memory -> (pinned, copied to the device)
  -> the engine's own compute step (``BatchForward``: resize + normalise on the device, forward
  under the engine's precision, pooling) -> features back on the host;
* end-to-end: slide -> tissue grid -> ``TileLoader`` threads -> the same compute step -> the
  zarr store (``embed_slide`` on a fresh store).

The ratio end-to-end / model-only says how much the reading, the hand-offs and the writes cost
on top of the model (goal on a GPU: >= 90%). The slide is a synthetic pyramid cut from the real
H&E sample (Aperio-like: 0.499 um/px, 240 px JPEG tiles, so grid tiles straddle native tiles
and are resampled, as on a real 20x scan), written once into a temporary folder.

    python bench/bench_embed.py [--model timm:vit_small_patch14_dinov2] [--vit-l] [--out t.md]

Weights are random (initialised in memory): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------- setup
def machine_info(device) -> dict:
    """CPU, cores, memory, torch, and the accelerator name if any."""
    import torch
    from _machine import cpu_name, ram_gib

    mem_gb = ram_gib()
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "accelerator": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["accelerator"] = (f"{torch.cuda.get_device_name(device)} "
                               f"({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})")
    return info


def random_encoder(name: str, device, seed: int = 0):
    """Encoder ``name`` built with random weights directly on ``device`` (no file, no download)."""
    import torch

    from napari_gpfm.encoders import Encoder, get_spec

    spec = get_spec(name)
    torch.manual_seed(seed)
    with torch.device(device):
        backbone = spec.builder()
    sha = hashlib.sha256(f"random-init:{spec.name}:{seed}".encode()).hexdigest()
    return Encoder(spec, backbone, weights_path=Path(f"random-init-seed{seed}"),
                   weights_sha256=sha, checkpoint_layout="timm").to(device)


def synthetic_slide(folder: Path, side: int, mpp: float = 0.499, tile: int = 240) -> Path:
    """An Aperio-like synthetic pyramid of ``side`` x ``side`` px (written once per folder)."""
    from napari_gpfm.slides.synthetic import write_synthetic_slide

    path = folder / f"synthetic-{side}-{mpp}-{tile}.tif"
    if not path.exists():
        write_synthetic_slide(path, side, side, mpp=mpp, tile=tile, seed=0)
    return path


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------- measurements
def model_only_rate(encoder, device, *, batch_size: int, read_size: int,
                    precision: str = "auto", compile: bool | str = False,
                    seconds: float = 5.0, min_batches: int = 3, warmup: int = 1) -> float:
    """Tiles/s of the engine's compute step on random uint8 tiles already in host memory."""
    import torch

    from napari_gpfm.embedding.engine import BatchForward, resolve_precision

    autocast = resolve_precision(precision, device)
    step = BatchForward(encoder, device, autocast, "cls", False, batch_size, compile)
    gen = torch.Generator().manual_seed(0)
    host = torch.randint(0, 256, (batch_size, read_size, read_size, 3), dtype=torch.uint8,
                         generator=gen)
    cuda = device.type == "cuda"
    if cuda:
        host = host.pin_memory()

    def run_one():
        feats, _ = step(host.to(device, non_blocking=cuda))
        return feats.to("cpu", non_blocking=cuda)

    for _ in range(warmup):
        run_one()
    _sync(device)
    n = 0
    t0 = time.perf_counter()
    while n < min_batches or time.perf_counter() - t0 < seconds:
        run_one()
        n += 1
        if cuda and n % 8 == 0:
            _sync(device)  # keep the queue bounded, as the engine's writer does
    _sync(device)
    return n * batch_size / (time.perf_counter() - t0)


@dataclass
class EndToEnd:
    tiles: int
    seconds: float
    tiling_s: float
    rate: float


def end_to_end_rate(encoder, device, slide_path: Path, *, batch_size: int, workers: int,
                    mpp: float, read_size: int, precision: str = "auto",
                    compile: bool | str = False, limit: int | None = None,
                    workdir: Path) -> EndToEnd:
    """Tiles/s of ``embed_slide`` (loader -> model -> store) on a fresh store."""
    from napari_gpfm.embedding.engine import embed_slide, prepare_store
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    with open_slide(slide_path) as slide:
        t0 = time.perf_counter()
        spec = TilingSpec(mpp=mpp, read_size=read_size, model_size=encoder.spec.input_size)
        grid = make_grid(slide, spec)
        tiling_s = time.perf_counter() - t0
        store = prepare_store(workdir / f"e2e-{time.time_ns()}.zarr", slide=slide, grid=grid,
                              encoder=encoder)
        result = embed_slide(slide, grid, encoder, store, device=device,
                             batch_size=batch_size, num_workers=workers, precision=precision,
                             compile=compile, limit=limit)
    return EndToEnd(result.computed, result.seconds, tiling_s, result.tiles_per_s)


# ---------------------------------------------------------------------- report
def markdown(info: dict, rows: list[dict], notes: list[str]) -> str:
    acc = f", {info['accelerator']}" if info["accelerator"] else ""
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
        f"{info['memory_gb']} GB RAM{acc}; Python {info['python']}, torch {info['torch']}.",
        "",
        "| model | device | precision | batch | loader threads | tiles | model-only tiles/s "
        "| end-to-end tiles/s | end-to-end / model-only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e2e = f"{r['e2e']:.1f}" if r.get("e2e") is not None else "-"
        ratio = f"{100 * r['e2e'] / r['model']:.0f}%" if r.get("e2e") is not None else "-"
        lines.append(f"| {r['model_name']} | {r['device']} | {r['precision']} | {r['batch']} | "
                     f"{r.get('workers', '-')} | {r.get('tiles', '-')} | {r['model']:.1f} | "
                     f"{e2e} | {ratio} |")
    lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from napari_gpfm.embedding.engine import resolve_device, resolve_precision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm:vit_small_patch14_dinov2")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--read-size", type=int, default=None,
                   help="tile side read at --mpp (default: the encoder's native read size)")
    p.add_argument("--slide", type=Path, default=None, help="slide (default: synthetic)")
    p.add_argument("--slide-px", type=int, default=6000, help="synthetic slide side")
    p.add_argument("--limit", type=int, default=192, help="end-to-end tiles per repeat")
    p.add_argument("--seconds", type=float, default=15.0,
                   help="model-only timing per repeat")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (best kept)")
    p.add_argument("--vit-l", action="store_true",
                   help="also time GPFM's ViT-L/14 model-only (random weights)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    info = machine_info(device)
    precision = resolve_precision(args.precision, device)
    prec_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision]
    encoder = random_encoder(args.model, device)
    read_size = args.read_size or encoder.spec.native_read_size
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="gpfm-bench-") as tmp:
        work = Path(tmp)
        slide = args.slide or synthetic_slide(work, args.slide_px)
        models, e2es = [], []
        # Alternating repeats, best of each: on a shared machine other jobs only slow us down.
        for rep in range(args.repeats):
            print(f"[{rep + 1}/{args.repeats}] model-only {args.model} batch {args.batch_size}",
                  file=sys.stderr)
            models.append(model_only_rate(encoder, device, batch_size=args.batch_size,
                                          read_size=read_size, precision=args.precision,
                                          seconds=args.seconds))
            print(f"  {models[-1]:.1f} tiles/s; end-to-end ...", file=sys.stderr)
            e2es.append(end_to_end_rate(encoder, device, slide, batch_size=args.batch_size,
                                        workers=args.workers, mpp=args.mpp,
                                        read_size=read_size, precision=args.precision,
                                        limit=args.limit, workdir=work))
            print(f"  {e2es[-1].rate:.1f} tiles/s ({e2es[-1].tiles} tiles)", file=sys.stderr)
        best = max(e2es, key=lambda e: e.rate)
        rows.append({"model_name": args.model, "device": str(device), "precision": prec_name,
                     "batch": args.batch_size, "workers": args.workers, "tiles": best.tiles,
                     "model": max(models), "e2e": best.rate})
        notes.append(
            f"End-to-end: {Path(slide).name}, {best.tiles} tissue tiles of {read_size} px at "
            f"{args.mpp} um/px resized to {encoder.spec.input_size} (tissue detection and grid: "
            f"{best.tiling_s:.1f} s, not counted), store written as float16 zarr. Best of "
            f"{args.repeats} alternating repeats; all model-only: "
            f"{', '.join(f'{m:.1f}' for m in models)}; all end-to-end: "
            f"{', '.join(f'{e.rate:.1f}' for e in e2es)} tiles/s."
        )
        if args.vit_l:
            del encoder
            big = random_encoder("gpfm", device)
            bsz = min(args.batch_size, 8) if device.type == "cpu" else args.batch_size
            rates = []
            for rep in range(max(1, args.repeats - 1)):
                print(f"[{rep + 1}] model-only gpfm (ViT-L/14) batch {bsz}", file=sys.stderr)
                rates.append(model_only_rate(big, device, batch_size=bsz,
                                             read_size=big.spec.native_read_size,
                                             precision=args.precision, seconds=args.seconds,
                                             min_batches=2))
                print(f"  {rates[-1]:.2f} tiles/s", file=sys.stderr)
            rows.append({"model_name": "gpfm (ViT-L/14, random weights)",
                         "device": str(device), "precision": prec_name, "batch": bsz,
                         "model": max(rates)})
            notes.append(f"ViT-L/14 model-only runs: {', '.join(f'{r:.2f}' for r in rates)} "
                         "tiles/s.")
    table = markdown(info, rows, notes)
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
