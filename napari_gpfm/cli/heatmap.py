"""`gpfm heatmap STORE --kind pca|clusters|similarity --out map.png|map.tif`."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "heatmap",
        help="write a map of a slide's embeddings: PCA colours, clusters or similarity to an ROI",
    )
    p.add_argument("store", help="embedding store (.zarr folder written by `gpfm embed`)")
    p.add_argument("--kind", choices=("pca", "clusters", "similarity"), default="pca")
    p.add_argument("--roi", help="similarity query: 'x,y,w,h' rectangle or 'x,y' point, level-0 px")
    p.add_argument("--k", type=int, default=6, help="number of clusters (--kind clusters)")
    p.add_argument("--top-k", type=int, default=20, help="similar tiles to list (--kind similarity)")
    p.add_argument("--include-query", action="store_true",
                   help="keep the query's own tiles in the similar-tile list")
    p.add_argument("--out", required=True, help="map.png (over the slide thumbnail) or map.tif")
    p.add_argument("--table", help="also write the cluster / top-k table as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_gpfm.analysis import views
    from napari_gpfm.analysis._io import check_output_path
    from napari_gpfm.cli._common import (
        check_map_path,
        open_store,
        parse_roi,
        roi_on_slide,
        slide_thumbnail,
        write_view,
    )
    from napari_gpfm.errors import ParameterError

    check_map_path(args.out)  # outputs first: a bad path must not cost the computation
    if args.table:
        check_output_path(args.table, "the table")
    store = open_store(args.store)
    if args.kind == "pca":
        view = views.pca_view(store)
    elif args.kind == "clusters":
        view = views.cluster_view(store, args.k)
    else:
        if not args.roi:
            raise ParameterError("--kind similarity needs --roi x,y,w,h (or x,y) in level-0 pixels")
        view = views.similarity_view(store, roi_on_slide(parse_roi(args.roi), store),
                                     k=args.top_k,
                                     exclude_query=not args.include_query)
    thumb = slide_thumbnail(store) if args.out.lower().endswith(".png") else None
    out = write_view(view, args.out, thumbnail=thumb)
    print(f"wrote {args.kind} map of {store.n_done} tiles to {out}")
    for row in view.table[:10]:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()))
    if args.table:
        from napari_gpfm.analysis._io import atomic_output

        with atomic_output(args.table, "table") as tmp:
            tmp.write_text(json.dumps(view.table, indent=2, default=str))
    return 0
