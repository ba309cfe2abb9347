"""`gpfm info SLIDE [--json]`: what a slide file holds."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show a slide's size, pyramid, pixel size and vendor")
    p.add_argument("slide", help="slide file (.svs, .tif, .ndpi, .ome.tif ...)")
    p.add_argument("--mpp", type=float, default=None,
                   help="level-0 microns per pixel, for files that do not record it")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_gpfm.slides import open_slide

    with open_slide(args.slide, mpp=args.mpp) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    mpp = (f"{info['mpp_x']:.4f} x {info['mpp_y']:.4f} um/px ({info['mpp_source']})"
           if info["mpp_x"] else "unknown (pass --mpp)")
    print(f"slide      {info['path']}")
    print(f"size       {info['width']} x {info['height']} px")
    print(f"pixel size {mpp}")
    print(f"objective  {info['objective_power'] or 'unknown'}")
    print(f"vendor     {info['vendor'] or 'generic TIFF'}")
    print(f"tile       {info['native_tile'][1]} x {info['native_tile'][0]} px")
    for i, ((w, h), ds) in enumerate(zip(info["level_dimensions"], info["level_downsamples"],
                                         strict=True)):
        print(f"level {i}    {w} x {h} px  (downsample {ds:.3f})")
    if info["associated_images"]:
        print(f"associated {', '.join(info['associated_images'])}")
    return 0
