"""`gpfm eval linear|knn|retrieval|augretrieval|all --tiles ... --models ...`: compare encoders."""

from __future__ import annotations

import sys

from napari_gpfm.cli._common import slide_pixel_size

PROTOCOL_CHOICES = ("linear", "knn", "retrieval", "augretrieval", "all")


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare encoders on labelled tiles: linear probe, kNN, retrieval, "
             "augmented-tile retrieval",
        description="Evaluate encoders with GPFM's protocols on one labelled tile set; every "
                    "encoder gets the same tiles, split and queries. Prints a Markdown table "
                    "(one row per encoder x protocol, metrics with bootstrap 95% intervals).",
        epilog="example: gpfm eval all --tiles slide.svs --regions regions.geojson --stride 112 "
               "--models default timm:vit_small_patch14_dinov2=W.safetensors "
               "--baseline colour-histogram --out report.md --csv report.csv "
               "(protocols first: --models takes every name after it)",
    )
    p.add_argument("protocols", nargs="+", choices=PROTOCOL_CHOICES, metavar="PROTOCOL",
                   help="linear, knn, retrieval, augretrieval, or all")
    p.add_argument("--tiles", required=True,
                   help="labelled tiles: an image folder (ROOT/<class>/*.png), a CSV "
                        "(slide,x,y,w,h,label[,group]) or a slide file with --regions")
    p.add_argument("--regions", help="QuPath GeoJSON of classified level-0 regions (with a slide)")
    p.add_argument("--models", nargs="+", default=[], metavar="NAME[=WEIGHTS]",
                   help="encoders to compare, e.g. default, gpfm=GPFM.pth, "
                        "timm:vit_small_patch14_dinov2=W.safetensors, baseline:colour-histogram")
    p.add_argument("--baseline", action="append", default=[], choices=("colour-histogram",),
                   help="add a baseline pseudo-encoder (colour-histogram: joint RGB histogram)")
    p.add_argument("--mpp", type=float, default=0.5, help="tile pixel size in um/px (slides)")
    p.add_argument("--size", type=int, default=224, help="tile side in pixels")
    p.add_argument("--stride", type=int, default=None,
                   help="grid step in pixels at --mpp for --regions (default: --size, no overlap)")
    p.add_argument("--slide-mpp", type=slide_pixel_size, default=None,
                   help="level-0 um/px for slides that do not record it")
    p.add_argument("--split", choices=("region", "band"), default="region",
                   help="hold out whole labelled regions (default) or horizontal bands")
    p.add_argument("--bands", type=int, default=5, help="number of bands for --split band")
    p.add_argument("--folds", type=int, default=0,
                   help="k-fold cross-validation over the regions (or bands): every tile is "
                        "tested once; for small labelled sets (0 = one held-out split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, probe and queries")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--epochs", type=int, default=3000, help="linear probe: maximum epochs")
    p.add_argument("--patience", type=int, default=100,
                   help="linear probe: epochs without a better validation AUROC before stopping")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per encoder batch")
    p.add_argument("--out", help="write the report as Markdown (.md)")
    p.add_argument("--csv", help="write the report as CSV")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_gpfm.analysis._io import check_output_path
    from napari_gpfm.errors import ParameterError
    from napari_gpfm.evaluation.features import BASELINE_PREFIX, check_model
    from napari_gpfm.evaluation.protocols import PROTOCOLS
    from napari_gpfm.evaluation.runner import EvalSettings, evaluate
    from napari_gpfm.evaluation.tilesets import load_tileset

    protocols = PROTOCOLS if "all" in args.protocols else tuple(dict.fromkeys(args.protocols))
    models = [*args.models, *(f"{BASELINE_PREFIX}{b}" for b in dict.fromkeys(args.baseline))]
    if not models:
        raise ParameterError("no encoder to evaluate: give --models NAME[=WEIGHTS] ... and/or "
                             "--baseline colour-histogram")
    for model in models:  # before reading any tile: a typo should cost nothing
        check_model(model)
    for path, what in ((args.out, "report"), (args.csv, "CSV table")):
        if path:
            check_output_path(path, what)
    settings = EvalSettings(
        protocols=protocols, split=args.split, n_bands=args.bands, folds=args.folds,
        seed=args.seed,
        n_boot=args.bootstrap, epochs=args.epochs, patience=args.patience, device=args.device,
        batch_size=args.batch_size,
    )

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    tileset = load_tileset(args.tiles, args.regions, mpp=args.mpp, size=args.size,
                           stride=args.stride, slide_mpp=args.slide_mpp)
    counts = ", ".join(f"{k} {v}" for k, v in tileset.class_counts().items())
    log(f"{tileset.description}: {len(tileset)} tiles ({counts})")
    report = evaluate(models, tileset, settings, log=log)
    text = report.to_markdown()
    print(text, end="")
    if args.out:
        log(f"report -> {report.write_markdown(args.out)}")
    if args.csv:
        log(f"table -> {report.write_csv(args.csv)}")
    return 0
