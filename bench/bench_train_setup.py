"""What gpfm-train's data setup costs over the tiling it has to do (a ratio, same run).

``GPFMDataModule.setup`` opens every slide of every source, checks it against its tiling
(missing pixel size, a scan the tiling would upsample), tiles it and concatenates the sources.
The baseline is the bare work underneath: ``open_slide`` + ``make_grid`` on the same slides
with the same specs. Both are timed alternately, ``--repeats`` times each, and the ratio of
the medians is the datamodule's overhead (one untimed round of each first). Run from the
repository root (configs name slides relative to it)::

    python bench/bench_train_setup.py       # default_model_stage3.yaml: 2 slides, 2 tile folders
    python bench/bench_train_setup.py --set 'data.sources=[...]'     # other sources
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _machine import report  # noqa: E402
from bench_embed import machine_info  # noqa: E402  (the bench folder is not a package)


def _bare_tiling(data) -> int:
    """open_slide + make_grid over every slide of every slide source; the tile count."""
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import make_grid

    n = 0
    for source in data.sources:
        spec = (source.tiling or data.tiling).spec()
        for path in source.slides:
            slide = open_slide(path)
            try:
                if not slide.has_mpp and source.default_mpp is not None:
                    slide.close()
                    slide = open_slide(path, mpp=source.default_mpp)
                n += len(make_grid(slide, spec))
            finally:
                slide.close()
    return n


def _setup(data) -> int:
    """The datamodule's setup; the tiles of its slide sources."""
    from gpfm_train.data.datasets import SlideTileDataset
    from gpfm_train.datamodule import GPFMDataModule

    dm = GPFMDataModule(data)
    dm.setup("fit")
    parts = getattr(dm.tiles, "datasets", [dm.tiles])
    return sum(len(p) for p in parts if isinstance(p, SlideTileDataset))


def main(argv: list[str] | None = None) -> int:
    import torch

    from gpfm_train.cli import load_run_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default_model_stage3.yaml")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. data.tiling.stride=112")
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args(argv)

    data = load_run_config(args.config, args.set).data
    if not any(source.slides for source in data.sources):
        parser.error(f"{args.config}: no source lists slides (manifests and tile folders "
                     "are not timed here)")
    times: dict[str, list[float]] = {"open_slide + make_grid": [], "GPFMDataModule.setup": []}
    tiles: dict[str, int] = {}
    jobs = (("open_slide + make_grid", _bare_tiling), ("GPFMDataModule.setup", _setup))
    for _, job in jobs:  # untimed: file caches, lazy imports
        job(data)
    for _ in range(args.repeats):
        for name, job in jobs:
            start = time.perf_counter()
            tiles[name] = job(data)
            times[name].append(time.perf_counter() - start)
    if len(set(tiles.values())) != 1:
        raise SystemExit(f"the two paths give different tile counts: {tiles}")
    base, setup = (statistics.median(t) for t in times.values())

    info = machine_info(torch.device("cpu"))
    n_slides = sum(len(source.slides) for source in data.sources)
    lines = [
        f"### gpfm-train data setup ({Path(args.config).name}: {n_slides} slides, "
        f"{tiles['GPFMDataModule.setup']} tiles)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GiB, Python "
        f"{info['python']}.",
        "",
        "| path | runs (s) | median (s) |",
        "|---|---|---|",
    ]
    for name, ts in times.items():
        lines.append(f"| {name} | {' / '.join(f'{t:.2f}' for t in ts)} | "
                     f"{statistics.median(ts):.2f} |")
    lines += ["", f"Ratio setup / bare tiling: {setup / base:.3f}"]
    report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
