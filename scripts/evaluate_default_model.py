"""Measure the embedded default model against its two baselines: the numbers of its card.

Baselines: the same network with random weights (seed 0), and a plain colour histogram.
Tiles: the labelled regions of the bundled sample slide (`data/labels/cmu1_regions.geojson`),
224 px at 0.5 um/px with a 112 px stride; regions are held out whole (no neighbouring-tile
leakage), in 5-fold cross-validation over the regions so that every tile is tested once (one
held-out split of this small set tests only 3 keratin tiles); 5 folds give each fold the
60 / 20 / 20 train / validation / test shares of the single split. Protocols: linear probe, weighted
kNN, retrieval, and retrieval of a tile's original under augmentation.

A second table checks how stable the probes' verdicts are: the same linear probe and kNN
under other partitions of the 16 regions (another fold seed, 4 and 3 folds) and on tiles cut
every 56 px instead of 112 (679 tiles, same regions), without the bootstrap.

    python scripts/evaluate_default_model.py [--weights W] [--out docs/default-model-eval.md]
                                             [--csv OUT.csv]  (default: beside --out)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW_NAMES = ("default (trained)", "default, random weights", "baseline:colour-histogram")
# (folds, seed) of the stability table; (5, 0) is the main table's partition.
PARTITIONS = ((5, 0), (5, 4), (4, 0), (3, 0))


def stability_table(models: list[str], regions: Path, tiles_112) -> str:
    """Balanced accuracy of the linear probe and kNN for ``models`` (named as ROW_NAMES)
    under every partition of PARTITIONS, on ``tiles_112`` (the main table's tiles, stride
    112 px) and on the same regions cut every 56 px: Markdown."""
    from napari_gpfm.data.sample import sample_slide_path
    from napari_gpfm.evaluation import knn_probe, linear_probe, load_extractor, load_tileset
    from napari_gpfm.evaluation.splits import make_folds

    header = ["encoder", "stride", "probe"] + [f"{k} folds, seed {s}" for k, s in PARTITIONS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tiles_56 = load_tileset(sample_slide_path(), regions=regions, mpp=0.5, size=224, stride=56)
    for stride, tiles in ((112, tiles_112), (56, tiles_56)):
        partitions = [make_folds(tiles, k, "region", seed) for k, seed in PARTITIONS]
        n_classes = len(tiles.class_names)
        for name, model in zip(ROW_NAMES, models, strict=True):
            x = load_extractor(model).embed(tiles.images)
            for probe_name, probe in (("linear", linear_probe), ("kNN", knn_probe)):
                cells = [probe(x, tiles.labels, folds, n_classes, n_boot=0)
                         .metrics["balanced_accuracy"].value for folds in partitions]
                lines.append(f"| {name} | {stride} px ({len(tiles)} tiles) | {probe_name} | "
                             + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from napari_gpfm.data.sample import sample_slide_path
    from napari_gpfm.encoders.default_model import write_random_twin
    from napari_gpfm.evaluation import EvalSettings, evaluate, load_tileset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path,
                    default=REPO / "napari_gpfm/encoders/weights/default.safetensors")
    ap.add_argument("--regions", type=Path, default=REPO / "data/labels/cmu1_regions.geojson")
    ap.add_argument("--out", type=Path, default=REPO / "docs/default-model-eval.md")
    ap.add_argument("--csv", type=Path, default=None,
                    help="the table as CSV (default: --out with a .csv suffix)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5,
                    help="cross-validation folds over the regions (0: one held-out split)")
    args = ap.parse_args()

    tiles = load_tileset(sample_slide_path(), regions=args.regions, mpp=0.5, size=224, stride=112)
    with tempfile.TemporaryDirectory() as tmp:
        random_weights = write_random_twin(args.weights, tmp)
        models = [f"default={args.weights}", f"default={random_weights}",
                  "baseline:colour-histogram"]
        report = evaluate(models, tiles,
                          EvalSettings(seed=0, n_boot=args.bootstrap, folds=args.folds),
                          log=print)
        stability = stability_table(models, args.regions, tiles)
    import dataclasses

    trained_id = report.rows[0].encoder_id
    report.rows = [
        dataclasses.replace(
            row,
            encoder=row.encoder if row.encoder.startswith("baseline")
            else ROW_NAMES[0] if row.encoder_id == trained_id else ROW_NAMES[1],
        )
        for row in report.rows
    ]
    report.write_markdown(args.out)
    report.write_csv(args.csv or args.out.with_suffix(".csv"))
    with args.out.open("a", encoding="utf-8") as out:
        out.write("\n## Stability: balanced accuracy under other partitions and tilings\n\n"
                  + stability)
    print(report.to_markdown())
    print(stability)


if __name__ == "__main__":
    main()
