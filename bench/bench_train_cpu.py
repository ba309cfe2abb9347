"""CPU training throughput of gpfm-train on the tiny configuration (samples per second).

Two numbers, both through the real Lightning training step (schedules, forward, backward,
per-group clipping, AdamW, EMA teacher):

* end to end: ``gpfm-train fit`` as configured (slides and tiles read, multi-crop augmentation
  in DataLoader workers, iBOT masks);
* model only: the same step on one pre-built batch fed again and again (no data loading).

A sample is one tile with all its crops (2 global + n local). The first ``--warmup`` steps are
not timed. Prints the machine and a Markdown table (also appended to ``--out``)::

    python bench/bench_train_cpu.py                       # tiny_cpu.yaml, 20 timed steps
    python bench/bench_train_cpu.py --steps 40 --set data.num_workers=1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _machine import report  # noqa: E402
from bench_embed import machine_info  # noqa: E402  (the bench folder is not a package)


def _timer(warmup: int):
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Wall time from the start of step ``warmup`` to the end of the last step."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.end: float | None = None
            self.steps = 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup and self.start is None:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.start is not None:
                self.steps += 1
                self.end = time.perf_counter()

    return StepTimer()


def _run(config: str, overrides: list[str], root: Path, steps: int, warmup: int,
         model_only: bool) -> dict:
    from torch.utils.data import DataLoader

    from gpfm_train.cli import load_run_config, prepare_fit

    pairs = [
        ("trainer.max_steps", warmup + steps),
        ("trainer.default_root_dir", str(root)),
        ("trainer.logger", None),
        ("trainer.enable_progress_bar", False),
        ("trainer.checkpoint_every_n_steps", 10**9),
    ]
    run = load_run_config(config, [*pairs, *overrides])
    timer = _timer(warmup)
    prepared = prepare_fit(run, callbacks=[timer])
    if model_only:
        dm = prepared.datamodule
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        loader = DataLoader([batch] * (warmup + steps), batch_size=None)
        prepared.trainer.fit(prepared.module, train_dataloaders=loader)
    else:
        prepared.trainer.fit(prepared.module, datamodule=prepared.datamodule)
    seconds = timer.end - timer.start
    batch_size = run.data.batch_size
    return {
        "mode": "model only" if model_only else "end to end",
        "batch": batch_size,
        "workers": run.data.num_workers,
        "steps": timer.steps,
        "s_per_step": seconds / timer.steps,
        "samples_per_s": batch_size * timer.steps / seconds,
        "run": run,
    }


def markdown(info: dict, rows: list[dict]) -> str:
    run = rows[0]["run"]
    b = run.model.backbone
    crops = run.data.crops
    lines = [
        f"### gpfm-train CPU throughput ({Path(run.source).name})",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GiB, torch "
        f"{info['torch']} ({info['torch_threads']} threads), Python {info['python']}.",
        f"Model: {b.arch} {b.kwargs} at {b.img_size} px, {crops.local_crops_number} local crops "
        f"of {crops.local_crops_size} px, {run.model.distill.out_dim} prototypes, "
        f"precision {run.trainer.precision}.",
        "",
        "| mode | batch | workers | timed steps | s/step | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['workers']} | {r['steps']} | "
                     f"{r['s_per_step']:.2f} | {r['samples_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. data.batch_size=4")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args(argv)

    info = machine_info(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        modes = [True] if args.skip_end_to_end else [False, True]
        for model_only in modes:
            rows.append(_run(args.config, args.set, Path(tmp) / str(model_only), args.steps,
                             args.warmup, model_only))
    report(markdown(info, rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
