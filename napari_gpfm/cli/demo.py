"""`gpfm demo`: the whole pipeline on the bundled H&E sample with the embedded default model.

Opens the sample slide, finds the tissue, tiles it, embeds the tiles with the default model
that ships inside the package, and writes into ``./gpfm-demo/``: a tiling preview, PCA and
cluster maps, a similarity map for a region on the epidermis, and ``report.md`` describing it
all. Runs offline on a laptop CPU in about a minute; run again and the store is reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from napari_gpfm.cli._common import RESUMES, slide_pixel_size
from napari_gpfm.errors import ParameterError

# A box on the epidermis of CMU-1-Small-Region (level-0 px): the dark purple band of
# stratified squamous epithelium in the upper middle of the slide.
EPIDERMIS_ROI = (1130, 700, 224, 224)


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled sample slide (writes ./gpfm-demo/)",
    )
    p.add_argument("--out", default="gpfm-demo", help="output folder (default ./gpfm-demo)")
    p.add_argument("--model", default="default", help="encoder (default: the embedded model)")
    p.add_argument("--weights", default=None, help="weights file for --model")
    p.add_argument("--slide", default=None, help="another slide instead of the bundled sample")
    p.add_argument("--slide-mpp", type=slide_pixel_size, default=None,
                   help="level-0 microns per pixel of --slide, if its file does not record it")
    p.add_argument("--roi", default=None,
                   help="similarity query 'x,y,w,h' in level-0 px (default: on the epidermis "
                   "of the sample; with --slide: the tissue tile nearest the tissue's centre)")
    p.add_argument("--device", default="auto")
    p.add_argument("--k", type=int, default=5,
                   help="clusters in the cluster map (at most the number of tiles)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo's embeddings made with other weights")
    p.set_defaults(func=run, interrupted=RESUMES)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                     for v in r.values()) + " |")
    return "\n".join(out) + "\n"


def _central_tile(grid) -> tuple[int, int, int, int]:
    """The tissue tile nearest the centre of all tissue tiles, as a level-0 'x,y,w,h' box."""
    import numpy as np

    xy = np.asarray(grid.coords, dtype=np.float64)
    x, y = grid.coords[int(np.argmin(((xy - xy.mean(axis=0)) ** 2).sum(axis=1)))]
    size = int(round(grid.tile_size_l0))
    return int(x), int(y), size, size


def run(args) -> int:
    from napari_gpfm.analysis import views
    from napari_gpfm.analysis._io import atomic_write_text, prepare_output_path
    from napari_gpfm.cli._common import parse_roi, write_view
    from napari_gpfm.data.sample import sample_slide_path
    from napari_gpfm.embedding.engine import embed_slide, prepare_store, resolve_device
    from napari_gpfm.embedding.store import default_store_path
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, detect_tissue, make_grid, render_preview

    # Every parameter is checked before the slow steps.
    if args.k < 2:
        raise ParameterError(f"--k {args.k}: the cluster map needs at least 2 clusters")
    device = resolve_device(args.device)
    slide_path = Path(args.slide) if args.slide else sample_slide_path()
    # The default query sits on the sample's epidermis; on another slide it would miss tissue.
    roi_text = args.roi or (None if args.slide else ",".join(str(v) for v in EPIDERMIS_ROI))
    roi = parse_roi(roi_text) if roi_text else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"--out {out} is a file; name a folder for the demo's files")
    t0 = time.perf_counter()

    print("[1/5] loading the encoder", flush=True)
    encoder = load_encoder(args.model, weights=args.weights, device="cpu")
    spec = TilingSpec(mpp=encoder.spec.native_mpp, read_size=encoder.spec.native_read_size,
                      model_size=encoder.spec.input_size)

    with open_slide(slide_path, default_mpp=args.slide_mpp) as slide:
        print(f"[2/5] finding tissue and tiling {slide.name} at {spec.mpp} um/px", flush=True)
        tissue = detect_tissue(slide, spec.tissue)
        grid = make_grid(slide, spec, tissue_mask=tissue)
        if len(grid) < 2:
            raise ParameterError(
                f"{slide.path} has {len(grid)} tissue tile(s) of {spec.field_of_view_um:.0f} um; "
                "the demo's maps need at least 2: try a larger slide"
            )
        if roi is None:
            roi = _central_tile(grid)
            roi_text = ",".join(str(v) for v in roi)
        else:  # before the embedding, not after it
            (x0, y0), (x1, y1) = roi.vertices.min(axis=0), roi.vertices.max(axis=0)
            width, height = slide.dimensions
            if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
                raise ParameterError(
                    f"--roi {roi_text} lies outside {slide.name} ({width} x {height} level-0 px)"
                )
        # Made only now, so a run refused above leaves no empty folder behind.
        prepare_output_path(out / "report.md", "the demo's files")
        render_preview(slide, grid, tissue, out / "tiles_preview.png")
        grid.to_csv(out / "tiles.csv")

        print(f"[3/5] embedding {len(grid.coords)} tiles with {encoder.encoder_id}", flush=True)
        store_path = default_store_path(out / "embeddings", slide, args.model, spec)
        store = prepare_store(store_path, slide=slide, grid=grid, encoder=encoder, spec=spec,
                              overwrite=args.overwrite)
        result = embed_slide(slide, grid, encoder, store, device=device)
        thumb = slide.thumbnail(1600)
        info = slide.info()

    print("[4/5] maps: PCA colours, clusters, similarity to the query region", flush=True)
    pca = views.pca_view(store)
    write_view(pca, out / "pca_map.png", thumbnail=thumb)
    k = min(args.k, len(grid))
    if k < args.k:
        print(f"      --k {args.k} is more than the {len(grid)} tissue tiles: k = {k}", flush=True)
    clusters = views.cluster_view(store, k)
    write_view(clusters, out / "cluster_map.png", thumbnail=thumb)
    similar = views.similarity_view(store, roi, k=10)
    write_view(similar, out / "similarity_map.png", thumbnail=thumb)
    write_view(similar, out / "similarity_map.tif")
    atomic_write_text(out / "similar_tiles.json", json.dumps(similar.table, indent=2, default=str),
                      "the similar tiles")

    print("[5/5] writing the report", flush=True)
    seconds = time.perf_counter() - t0
    lowered = f", lowered from --k {args.k} to the tile count" if k < args.k else ""
    report = f"""# napari-gpfm demo

Slide: `{info['path']}` ({info['width']} x {info['height']} px, {info['mpp_x']:.3f} um/px,
{info['vendor'] or 'generic TIFF'}).

Encoder: `{encoder.encoder_id}` ({encoder.spec.display_name}); licence: {encoder.spec.licence}.

Tiling: {spec.read_size} px at {spec.mpp} um/px (field of view {spec.field_of_view_um:.0f} um),
resized to {spec.model_size} px; minimum tissue fraction {spec.min_tissue}; tiling id
`{spec.id}`.

| step | result |
|---|---|
| tissue area | {tissue.area_mm2:.2f} mm2 |
| tissue tiles | {len(grid.coords)} |
| embedded this run | {result.computed} tiles in {result.seconds:.1f} s ({result.tiles_per_s:.1f} tiles/s, {result.device}, {result.precision}) |
| store | `{store.path}` |
| total time | {seconds:.1f} s |

## Files
- `tiles_preview.png`: the thumbnail with the tissue contour (green) and the kept tiles (blue).
- `tiles.csv`: tile coordinates (level-0 px) with the tiling recorded in the header.
- `pca_map.png`: the first three principal components of the embeddings as RGB: tiles that
  look alike to the model share a colour.
- `cluster_map.png`: k-means clusters (k = {k}{lowered}) of the embeddings.
- `similarity_map.png` / `.tif`: cosine similarity of every tile to the query region
  `{roi_text}` (level-0 x, y, w, h); bright = similar.
- `similar_tiles.json`: the 10 tiles most similar to the query (query tiles excluded).

## Clusters
{_table(clusters.table)}
## Tiles most similar to the query region
{_table(similar.table)}"""
    atomic_write_text(out / "report.md", report, "the report")
    print(f"done in {seconds:.1f} s: see {out}/report.md")
    return 0
