"""Which change of a tile does an encoder fail to see through? The card's retrieval under
augmentation, taken apart.

`scripts/evaluate_default_model.py` asks each encoder to find a tile's original among the 163
tiles of the sample slide's labelled regions from a copy changed four ways at once (a
dihedral transform, a small rotation and crop, colour jitter, JPEG; see
`napari_gpfm.evaluation.augment`). This script applies each of the four alone, with the very
parameters the full augmentation draws for that tile, and splits the full augmentation's
queries into tissue and background tiles, each searched among its own kind (background tiles
are blank glass: finding one of 88 near-identical tiles measures little but chance).

    python scripts/diagnose_augmentation_retrieval.py [--weights [NAME=]W ...] [--out OUT.md]

Without --weights it measures the shipped default. The colour histogram is always added.
Prints three Markdown tables (all tiles, tissue tiles, background tiles) of top-1 / top-5 /
MRR per encoder and condition, and writes them to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# What switches each of the four changes off (AugmentParams overrides).
SWITCHED_OFF = {
    "dihedral": {"dihedral": False},
    "rotation + crop": {"max_rotation_deg": 0.0, "min_crop": 1.0},
    "colour": {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0},
    "JPEG": {"jpeg_quality": None},
}
# condition -> overrides: "all" is the card's augmentation, "X only" every other change off.
CONDITIONS = {"all": {}} | {
    f"{kept} only": {k: v for change, off in SWITCHED_OFF.items() if change != kept
                     for k, v in off.items()}
    for kept in SWITCHED_OFF
}


def _named(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` -> (row name, model spec for load_extractor)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    return name, f"default={path}"


def retrieval_rows(extractor, tiles, augmented: dict[str, np.ndarray],
                   tissue: np.ndarray, seed: int) -> dict[str, dict[str, tuple]]:
    """``{subset: {condition: (top-1, top-5, MRR)}}`` of one encoder: every tile among all,
    tissue tiles among tissue tiles, background tiles among background tiles."""
    from napari_gpfm.evaluation.protocols import augmentation_retrieval

    originals = extractor.embed(tiles.images)
    subsets = {"all": np.ones_like(tissue), "tissue": tissue, "background": ~tissue}
    rows: dict[str, dict[str, tuple]] = {subset: {} for subset in subsets}
    for condition, images in augmented.items():
        queries = extractor.embed(images)
        for subset, keep in subsets.items():
            m = augmentation_retrieval(originals[keep], queries[keep], tiles.labels[keep],
                                       seed=seed, n_boot=0).metrics
            rows[subset][condition] = (m["top1"].value, m["top5"].value, m["mrr"].value)
    return rows


def markdown(rows: dict[str, dict[str, tuple]], title: str) -> str:
    """One table: an encoder per row, a condition per column, top-1 / top-5 / MRR."""
    columns = list(next(iter(rows.values())))
    lines = [title, "", "| encoder | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        cells = (" / ".join(f"{v:.3f}" for v in row[c]) for c in columns)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from evaluate_default_model import sample_set

    from napari_gpfm.evaluation.augment import AugmentParams, augment_tiles
    from napari_gpfm.evaluation.features import COLOUR_HISTOGRAM, load_extractor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="+", default=[
        f"default={REPO / 'napari_gpfm/encoders/weights/default.safetensors'}"],
        help="default-model weights to measure, each PATH or NAME=PATH")
    ap.add_argument("--seed", type=int, default=0, help="augmentation seed (the card's: 0)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    sample = sample_set()
    tiles = sample.tiles(sample.strides[0])  # the card's main table's tiles
    tissue = tiles.labels != tiles.class_names.index("background")
    base = AugmentParams()
    augmented = {c: augment_tiles(tiles.images, args.seed, dataclasses.replace(base, **o))
                 for c, o in CONDITIONS.items()}
    models = [_named(w) for w in args.weights] + [("colour histogram", COLOUR_HISTOGRAM)]
    measured = {name: retrieval_rows(load_extractor(spec), tiles, augmented, tissue, args.seed)
                for name, spec in models}
    sizes = {"all": len(tissue), "tissue": int(tissue.sum()), "background": int((~tissue).sum())}
    table = "\n".join(
        markdown({name: rows[subset] for name, rows in measured.items()},
                 f"Top-1 / top-5 / MRR, {subset} tiles of the sample slide's labelled regions "
                 f"({n}{'' if subset == 'all' else ', searched among their own kind'}; "
                 f"augmentation seed {args.seed}).")
        for subset, n in sizes.items())
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
