"""`gpfm tiles SLIDE --out coords.csv`: the tissue tiles of a slide at a target resolution."""

from __future__ import annotations

import json
from pathlib import Path

from napari_gpfm.cli._common import slide_pixel_size


def register(sub) -> None:
    p = sub.add_parser(
        "tiles",
        help="find the tissue and write the tile grid (level-0 coordinates) as CSV",
        description="Detect the tissue of a slide and lay a grid of square tiles over it at a "
        "target resolution; write the kept tiles' level-0 top-left corners as CSV (its header "
        "records the tiling spec and the slide).",
    )
    p.add_argument("slide", help="slide file (.svs, .tif, .ndpi, .ome.tif ...)")
    p.add_argument("--slide-mpp", "--mpp-slide", dest="slide_mpp", type=slide_pixel_size,
                   default=None,
                   metavar="MPP",
                   help="the slide's own level-0 microns per pixel, for files that do not record it")
    p.add_argument("--mpp", type=float, default=0.5,
                   help="target resolution of the tiles in um/px (default 0.5, i.e. 20x)")
    p.add_argument("--size", type=int, default=224,
                   help="tile side the model sees, in px (default 224)")
    p.add_argument("--read-size", type=int, default=None, metavar="N",
                   help="tile side read at --mpp, in px (default: --size); the field of view is "
                   "read-size x mpp microns (GPFM's own: --read-size 256 --size 224)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="step between tiles in px at --mpp (default: the read size, no overlap)")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="keep tiles whose tissue fraction is at least this (0-1, default 0.5)")
    p.add_argument("--out", required=True, help="CSV file to write (index,x,y,tissue_fraction)")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="also write a PNG: thumbnail, tissue outline (green), kept tiles (blue)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_gpfm.analysis._io import prepare_output_path
    from napari_gpfm.errors import ParameterError, SlideError
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling.grid import TILE_SIDE_RANGE, TilingSpec, make_grid
    from napari_gpfm.tiling.tissue import detect_tissue

    # Checked here under the flag the user gave: without --read-size, --size is both sides,
    # and TilingSpec would name --read-size.
    lo, hi = TILE_SIDE_RANGE
    for flag, value in (("--size", args.size), ("--read-size", args.read_size)):
        if value is not None and not lo <= value <= hi:
            raise ParameterError(f"{flag} {value}: a tile side must be {lo}-{hi} px")
    # Refuse an output that cannot be written before the work, not after it.
    if args.preview and Path(args.preview).suffix.lower() != ".png":
        raise ParameterError(f"--preview {args.preview}: the preview is a PNG; name it .png")
    for path, what in ((args.out, "the tile grid"), (args.preview, "the preview")):
        if path:
            prepare_output_path(path, what)
    spec = TilingSpec(
        mpp=args.mpp,
        read_size=args.read_size if args.read_size is not None else args.size,
        model_size=args.size,
        stride=args.stride,
        min_tissue=args.min_tissue,
    )
    with open_slide(args.slide, default_mpp=args.slide_mpp) as slide:
        if not slide.has_mpp:
            raise SlideError(
                f"{slide.path} has no pixel size (microns per pixel) in its metadata; pass the "
                "slide's own with --slide-mpp (0.25 for 40x, 0.5 for 20x scans)"
            )
        mask = detect_tissue(slide, spec.tissue)
        grid = make_grid(slide, spec, tissue_mask=mask)
        if not grid.candidates:
            raise ParameterError(
                f"a tile of {spec.field_of_view_um:.0f} um ({grid.tile_size_l0:.0f} level-0 px) "
                f"is larger than {slide.name} ({slide.dimensions[0]} x {slide.dimensions[1]} px); "
                "use a smaller --read-size or a coarser --mpp"
            )
        out = grid.to_csv(args.out)
        preview = None
        if args.preview:
            from napari_gpfm.tiling.preview import render_preview

            preview = render_preview(slide, grid, mask, args.preview)
        level = slide.best_level_for_downsample(spec.mpp / slide.mpp)
    summary = {
        "slide": str(slide.path),
        "out": str(out),
        "preview": str(preview) if preview else None,
        "tiles": len(grid),
        "candidates": grid.candidates,
        "tissue_area_mm2": round(mask.area_mm2, 4),
        "tissue_threshold": mask.threshold,
        "spec_id": spec.id,
        "spec": spec.to_dict(),
        "tile_size_l0": grid.tile_size_l0,
        "read_level": level,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    fov = spec.read_size * spec.mpp
    print(f"tiles      {len(grid)} kept of {grid.candidates} "
          f"(tissue >= {spec.min_tissue:g} of each tile)")
    print(f"tile       {spec.read_size} px at {spec.mpp:g} um/px = {fov:g} um "
          f"({grid.tile_size_l0:.1f} level-0 px, read from level {level}), "
          f"stride {spec.stride_px} px, model {spec.model_size} px")
    print(f"tissue     {mask.area_mm2:.2f} mm2")
    print(f"spec id    {spec.id}")
    print(f"wrote      {out}")
    if preview:
        print(f"preview    {preview}")
    return 0
