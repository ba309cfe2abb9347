"""Cost of the colour augmentations of the multi-crop pipeline, per sample, on one CPU thread.

Real tiles of the sample slide at its 0.5 um/px (512 px for the GPFM recipe, whose tiles are
512 px: 2 x 224 px + 8 x 98 px crops; 224 px for the default model's stages: 2 x 112 + 2 x 56
px crops; the cost depends on pixels, not on their size in um) go through
``MultiCropAugmentation`` with four colour settings, alternated in each repeat so that the
machine's load falls on all of them alike:

* ``jitter``: the configured colour jitter and grayscale (the recipe's baseline);
* ``stain``: the stain jitter instead (``stain_jitter=(0.05, 0.05)``, p 0.8), no colour jitter;
* ``none``: no colour augmentation (what geometry, blur and normalisation cost alone);
* ``jitter + clean``: the baseline plus the global crops before the photometric changes
  (``clean_global_crops``, for an expert with ``clean_input``).

The table gives the best repeat's ms per sample and its ratio to ``jitter``::

    python bench/bench_augment.py [--repeats 5] [--samples 40] [--out table.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _machine import report  # noqa: E402
from bench_embed import machine_info  # noqa: E402  (the bench folder is not a package)

SETTINGS = {
    "jitter": {},
    "stain": {"color_jitter_p": 0.0, "grayscale_p": 0.0, "stain_jitter": (0.05, 0.05),
              "stain_jitter_p": 0.8},
    "none": {"color_jitter_p": 0.0, "grayscale_p": 0.0},
    "jitter + clean": {"clean_global_crops": True},
}
PIPELINES = {
    # name: (MultiCropConfig fields, tile px)
    "GPFM recipe (2 x 224 + 8 x 98 px)": ({}, 512),
    "default-model stages (2 x 112 + 2 x 56 px)": (
        {"global_crops_size": 112, "local_crops_size": 56, "local_crops_number": 2,
         "color_jitter": (0.2, 0.2, 0.1, 0.02), "grayscale_p": 0.05, "solarize_p": 0.0},
        224),
}


def _tiles(size: int, count: int):
    from napari_gpfm.data.sample import sample_slide_path
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    with open_slide(sample_slide_path()) as slide:
        grid = make_grid(slide, TilingSpec(mpp=slide.mpp, read_size=size, model_size=size,
                                           stride=size // 4, min_tissue=0.25))
        return [slide.read_region_mpp((int(x), int(y)), size, slide.mpp)
                for x, y in grid.coords[:count]]


def main() -> int:
    import torch

    from gpfm_train.data.augment import MultiCropAugmentation, MultiCropConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=40, help="tiles per repeat")
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's share

    lines = [f"Machine: {machine_info(torch.device('cpu'))}", "",
             "| pipeline | colour | ms / sample (best) | all repeats | vs jitter |",
             "|---|---|---:|---|---:|"]
    for name, (fields, size) in PIPELINES.items():
        tiles = _tiles(size, args.samples)
        augs = {k: MultiCropAugmentation(MultiCropConfig(**{**fields, **v}))
                for k, v in SETTINGS.items()}
        times: dict[str, list[float]] = {k: [] for k in SETTINGS}
        for repeat in range(args.repeats):
            for key, aug in augs.items():
                t0 = time.perf_counter()
                for i, tile in enumerate(tiles):
                    aug(tile, seed=repeat * 1000 + i)
                times[key].append((time.perf_counter() - t0) * 1000 / len(tiles))
        base = min(times["jitter"])
        for key, values in times.items():
            lines.append(f"| {name} | {key} | {min(values):.1f} | "
                         f"{', '.join(f'{v:.1f}' for v in values)} | {min(values) / base:.2f} |")
    report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
