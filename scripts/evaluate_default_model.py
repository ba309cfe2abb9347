"""Measure the embedded default model against its two baselines: the numbers of its card.

Baselines: the same network with random weights (seed 0), and a plain colour histogram.
Tiles: the labelled regions of the bundled sample slide (`data/labels/cmu1_regions.geojson`),
224 px at 0.5 um/px with a 112 px stride; regions are held out whole (no neighbouring-tile
leakage), in 5-fold cross-validation over the regions so that every tile is tested once (one
held-out split of this small set tests only 3 keratin tiles); 5 folds give each fold the
60 / 20 / 20 train / validation / test shares of the single split. Protocols: linear probe, weighted
kNN, retrieval, and retrieval of a tile's original under augmentation.

    python scripts/evaluate_default_model.py [--weights W] [--out docs/default-model-eval.md]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def random_copy(weights: Path, folder: Path) -> Path:
    """The default network with random weights (seed 0), beside a copy of its JSON."""
    import timm
    import torch
    from safetensors.torch import save_file

    from napari_gpfm.encoders.default_model import DefaultModelConfig

    cfg = DefaultModelConfig.read(weights.with_suffix(".json"))
    torch.manual_seed(0)
    model = timm.create_model(cfg.architecture, **cfg.model_kwargs, num_classes=0)
    out = folder / "default-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    shutil.copy(weights.with_suffix(".json"), out.with_suffix(".json"))
    return out


def main() -> None:
    from napari_gpfm.data.sample import sample_slide_path
    from napari_gpfm.evaluation import EvalSettings, evaluate, load_tileset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path,
                    default=REPO / "napari_gpfm/encoders/weights/default.safetensors")
    ap.add_argument("--regions", type=Path, default=REPO / "data/labels/cmu1_regions.geojson")
    ap.add_argument("--out", type=Path, default=REPO / "docs/default-model-eval.md")
    ap.add_argument("--csv", type=Path, default=REPO / "docs/default-model-eval.csv")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5,
                    help="cross-validation folds over the regions (0: one held-out split)")
    args = ap.parse_args()

    tiles = load_tileset(sample_slide_path(), regions=args.regions, mpp=0.5, size=224, stride=112)
    with tempfile.TemporaryDirectory() as tmp:
        random_weights = random_copy(args.weights, Path(tmp))
        report = evaluate(
            [f"default={args.weights}", f"default={random_weights}", "baseline:colour-histogram"],
            tiles,
            EvalSettings(seed=0, n_boot=args.bootstrap, folds=args.folds),
            log=print,
        )
    import dataclasses

    trained_id = report.rows[0].encoder_id
    report.rows = [
        dataclasses.replace(
            row,
            encoder=row.encoder if row.encoder.startswith("baseline")
            else "default (trained)" if row.encoder_id == trained_id
            else "default, random weights",
        )
        for row in report.rows
    ]
    report.write_markdown(args.out)
    report.write_csv(args.csv)
    print(report.to_markdown())


if __name__ == "__main__":
    main()
