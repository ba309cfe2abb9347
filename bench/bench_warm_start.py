"""Cost of warm-starting gpfm-train from exported weights, with and without resampling the
position embedding (weights of another ``img_size``: DINOv2's high-resolution phase).

The warm start runs once per ``gpfm-train fit``; this measures ``load_backbone_weights`` on the
embedded default model's weights (112 px, 8 x 8 tokens) into a backbone at the same size (the
baseline, no resampling) and at larger sizes. Prints the machine and a Markdown table::

    python bench/bench_warm_start.py [--repeats 50] [--sizes 112 168 224]
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

from bench_embed import machine_info  # noqa: E402  (the bench folder is not a package)


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from gpfm_train.models import DistillConfig, GPFMDistiller, build_student_backbone
    from napari_gpfm.encoders.default_model import DefaultModelConfig, default_files

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 168, 224])
    args = ap.parse_args()

    json_path, weights_path = default_files()
    config = DefaultModelConfig.read(json_path)
    weights = load_file(str(weights_path))
    kwargs = {k: v for k, v in config.model_kwargs.items() if k in ("embed_dim", "depth",
                                                                   "num_heads")}
    heads = DistillConfig(n_local=2, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                          experts=())
    print(machine_info(torch.device("cpu")))
    print(f"weights: {weights_path.name} ({config.input_size} px), {args.repeats} repeats, "
          "median kept\n")
    print("| backbone img_size | tokens | load_backbone_weights (ms) | ratio to no resampling |")
    print("|---|---|---|---|")
    baseline = None
    for size in [config.input_size] + [s for s in args.sizes if s != config.input_size]:
        distiller = GPFMDistiller(
            build_student_backbone(config.architecture, img_size=size, drop_path_rate=0.0,
                                   **kwargs),
            {},
            heads,
        )
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            distiller.load_backbone_weights(weights)
            times.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(times)
        baseline = baseline or ms
        grid = size // config.patch_size if config.patch_size else "?"
        print(f"| {size} | {grid} x {grid} | {ms:.2f} | {ms / baseline:.2f} |")


if __name__ == "__main__":
    main()
