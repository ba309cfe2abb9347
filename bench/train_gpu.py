"""GPU check of GPFM pretraining: step time, peak memory and MFU of a recipe (ViT-L/14 default).

For a lent GPU (a few minutes on an H100). Runs the real Lightning training step of
``gpfm_vitl14.yaml`` (schedules, DINO + iBOT + KoLeo, expert distillation, per-group clipping,
AdamW, EMA teacher) on one device, on synthetic batches already in host memory (so the numbers
are the model's, not the tile reader's), twice:

* with the three experts, built with random weights from napari_gpfm's registry builders
  (UNI ViT-L/16, Phikon ViT-B/16, CONCH's ViT-B/16 image tower: the real shapes and costs);
* without experts (DINOv2 self-distillation alone).

MFU = model FLOPs per step (counted once with ``torch.utils.flop_counter`` on the real step:
student forward + backward, teacher and expert forwards; with ``--grad-checkpointing`` it also
counts the recomputed forward) / step time / the card's dense bf16/fp16 peak. Prints the card name and a Markdown table (also appended to ``--out``)::

    python bench/train_gpu.py --out results.md                 # batch 96 per GPU, bf16-mixed
    python bench/train_gpu.py --batch-size 64 --grad-checkpointing
    python bench/train_gpu.py --strategy fsdp --cases experts   # the FSDP code path
    python bench/train_gpu.py --smoke                          # tiny sizes on the CPU

Any other config measures the same way (``--config``, ``--set KEY=VALUE``). For a small model
the step is bound by the host, not the GPU: ``--profile N`` prints the N-step profile's costliest
operators by self CPU time, and ``--loader-seconds S`` times the config's real training
DataLoader alone (its sources, crops and workers) for S seconds, to set beside the step::

    python bench/train_gpu.py --config default_model_stage3.yaml --cases none \
        --precision 32-true --batch-size 8 --steps 50 --profile 20 --loader-seconds 30
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_embed import machine_info, random_encoder  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
)
RECIPE_EXPERTS = ("uni", "phikon", "conch")


def peak_flops(device_name: str) -> float | None:
    """The card's dense half-precision peak, or None when unknown."""
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value
    return None


def synthetic_batch(batch: int, global_size: int, local_size: int, n_local: int,
                    patch: int, seed: int = 0) -> dict:
    """A multi-crop batch in the distiller's format with real iBOT masks."""
    import random

    import torch

    from gpfm_train.masking import collate_masks

    gen = torch.Generator().manual_seed(seed)
    out = {
        "global_crops": torch.randn(2 * batch, 3, global_size, global_size, generator=gen),
        "local_crops": torch.randn(n_local * batch, 3, local_size, local_size, generator=gen),
    }
    out.update(collate_masks(2 * batch, global_size // patch, generator=random.Random(seed)))
    return out


def _overrides(args) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [
        ("data.batch_size", args.batch_size),
        ("model.backbone.grad_checkpointing", args.grad_checkpointing),
        ("trainer.accelerator", "cpu" if args.smoke else "gpu"),
        ("trainer.devices", 1),
        ("trainer.num_nodes", 1),
        ("trainer.strategy", args.strategy),
        ("trainer.precision", args.precision),
        ("trainer.logger", None),
        ("trainer.enable_progress_bar", False),
        ("trainer.checkpoint_every_n_steps", 10**9),
        ("trainer.extra", {}),
        ("data.sources", [{"tile_folder": "."}]),  # unused: batches are synthetic
    ]
    if args.smoke:
        pairs += [
            ("model.backbone.arch", "vit_small_patch14_dinov2"),
            ("model.backbone.img_size", 56),
            ("model.backbone.kwargs", {"embed_dim": 48, "depth": 2, "num_heads": 2}),
            ("model.distill.n_local", 2),
            ("model.distill.out_dim", 256),
            ("model.distill.head_hidden_dim", 64),
            ("model.distill.head_bottleneck_dim", 32),
            ("data.crops.global_crops_size", 56),
            ("data.crops.local_crops_size", 28),
            ("data.crops.local_crops_number", 2),
        ]
    return pairs


def _experts(run, smoke: bool, device) -> dict:
    """Random-weight experts of the recipe's shapes (smoke: timm's tiny test_vit instead)."""
    import dataclasses

    experts = {}
    for source in run.model.experts:
        name = "timm:test_vit" if smoke else source.encoder_name
        experts[source.name] = random_encoder(name, device)
    if smoke:  # test_vit takes 160 px inputs
        sources = tuple(dataclasses.replace(s, input_size=160) for s in run.model.experts)
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, experts=sources))
    return experts, run


def _count_flops(module, batch, device, precision: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    on_device = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    module.to(device).train()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=dtype or torch.float32,
                                 enabled=dtype is not None):
        losses = module(on_device, teacher_temp=0.04)
        losses["total"].backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _start_profiler(device):
    """A profiler recording every step from now on (CPU, and CUDA where the step runs there)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities)
    prof.start()
    return prof


def _profile_table(prof, rows: int = 20) -> str:
    """The profiled steps' costliest operators by self CPU time (the host's share of a step)."""
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                     max_name_column_width=60)


def loader_rate(args) -> tuple[float, int]:
    """Samples/s of the config's real training DataLoader alone, over ``args.loader_seconds``."""
    from gpfm_train.cli import load_run_config
    from gpfm_train.datamodule import GPFMDataModule

    run = load_run_config(args.config, [("data.batch_size", args.batch_size), *args.set])
    module = GPFMDataModule(run.data)
    module.setup("fit")
    batches = iter(module.train_dataloader())
    for _ in range(max(2, run.data.num_workers)):  # every worker started and warm
        next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.loader_seconds:
        n += len(next(batches)["global_crops"]) // 2
    return n / (time.perf_counter() - start), run.data.num_workers


def run_case(args, with_experts: bool, device) -> dict:
    import dataclasses

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from gpfm_train.cli import build_trainer, load_run_config
    from gpfm_train.module import GPFMPretrainModule

    run = load_run_config(args.config, [*_overrides(args), *args.set])
    if with_experts:
        experts, run = _experts(run, args.smoke, device)
    else:
        experts = {}
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, experts=()))
    steps = args.warmup + args.steps + args.profile
    run = dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, max_steps=steps))
    crops, masks = run.data.crops, run.data.masks
    batch = synthetic_batch(args.batch_size, crops.global_crops_size, crops.local_crops_size,
                            crops.local_crops_number, masks.patch_size)

    pl.seed_everything(0, verbose=False)
    module = GPFMPretrainModule(run.model, experts=experts)
    flops = _count_flops(module, batch, device, args.precision)

    class Timer(Callback):
        def __init__(self):
            self.times: list[float] = []
            self.profiler = None

        def on_train_batch_start(self, trainer, pl_module, b, i):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            if self.profiler is not None:
                self.profiler.step()
            elif args.profile and len(self.times) == steps - args.profile:
                self.profiler = _start_profiler(device)

    timer = Timer()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        run = dataclasses.replace(
            run, trainer=dataclasses.replace(run.trainer, default_root_dir=tmp))
        trainer = build_trainer(run, callbacks=[timer])
        loader = DataLoader([batch] * steps, batch_size=None, pin_memory=device.type == "cuda")
        trainer.fit(module, train_dataloaders=loader)
    profile = None
    if timer.profiler is not None:
        timer.profiler.stop()
        profile = _profile_table(timer.profiler)
    timed = timer.times[args.warmup:args.warmup + args.steps]
    step_s = sorted(timed)[len(timed) // 2]
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    row = {
        "experts": ", ".join(experts) if experts else "none",
        "batch": args.batch_size,
        "precision": args.precision,
        "step_s": step_s,
        "samples_per_s": args.batch_size / step_s,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None,
        "peak_mem_gib": peak_mem,
        "loss": float(trainer.logged_metrics["loss/total"]),
        "profile": profile,
    }
    del module, trainer, experts
    gc.collect()
    return row


def markdown(info: dict, rows: list[dict], args) -> str:
    lines = [
        f"### gpfm-train recipe step on one GPU ({Path(args.config).name})"
        + (" (smoke, CPU)" if args.smoke else ""),
        "",
        f"Device: {info.get('accelerator') or info['cpu']}; torch {info['torch']}. "
        f"Batch {args.batch_size} per device, {args.precision}, strategy {args.strategy}, "
        f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}, median of "
        f"{args.steps} steps after {args.warmup} warm-up steps; synthetic batches.",
        "",
        "| experts | step (s) | samples/s | GFLOP/step | achieved TFLOP/s | MFU | peak mem (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['experts']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['gflop_per_step']:.1f} | {r['achieved_tflops']:.2f} | {mfu} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="per device (96; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3; smoke 1)")
    parser.add_argument("--precision", default=None,
                        help="bf16-mixed (default on GPU), 16-mixed, 32-true (smoke default)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--strategy", default="auto", choices=("auto", "fsdp"),
                        help="fsdp: the recipe's FSDP SHARD_GRAD_OP wrapping, on one device")
    parser.add_argument("--cases", default="experts,none",
                        help="comma list of experts,none (default both)")
    parser.add_argument("--config", default="gpfm_vitl14.yaml",
                        help="run config to measure (gpfm_vitl14.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.distill.n_local=4")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N more steps after the timed ones; print the top operators")
    parser.add_argument("--loader-seconds", type=float, default=0, metavar="S",
                        help="also time the config's real training DataLoader alone for S s")
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.smoke else 96)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.precision = args.precision or ("32-true" if args.smoke else "bf16-mixed")

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here; run with --smoke to check the script on the CPU")
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    info = machine_info(device)
    print(f"device: {info.get('accelerator') or info['cpu']}", flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in ("experts", "none"):
            parser.error(f"--cases: unknown case {case!r}")
        try:
            rows.append(run_case(args, case == "experts", device))
        except torch.OutOfMemoryError:
            print(f"{case}: out of memory at batch {args.batch_size}; try --grad-checkpointing "
                  "or a smaller --batch-size", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        if rows:
            print(markdown(info, rows[-1:], args), flush=True)
    text = markdown(info, rows, args)
    for r in rows:  # in --out too: a lease's output tail keeps only the end of a long table
        if r["profile"]:
            experts = "no experts" if r["experts"] == "none" else f"experts {r['experts']}"
            text += (f"\nProfile of {args.profile} steps ({experts}), the costliest operators "
                     f"by self CPU time:\n\n```\n{r['profile']}\n```\n")
    if args.loader_seconds:
        rate, workers = loader_rate(args)
        text += (f"\nThe config's real training DataLoader alone ({workers} workers, batch "
                 f"{args.batch_size}): {rate:.0f} samples/s = {rate / args.batch_size:.1f} "
                 f"batches/s over {args.loader_seconds:.0f} s.\n")
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
