"""`gpfm index build|add|remove|info|search`: a searchable library of many slides' tiles.

A library holds the embeddings of many slides made with one encoder and one tiling, in one
faiss index: "where else, across all my slides, does tissue look like this region?".
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from napari_gpfm.cli._common import ALL_OR_NOTHING
from napari_gpfm.errors import ParameterError

KIND_HELP = """index kinds (figures for 1024-d embeddings on a busy 2-core CPU; see
docs/benchmarks.md):
  flat   exact search (faiss IndexFlatIP): recall 1.0; 4 KiB per tile in the index file,
         memory-mapped; build is a copy; a query reads every vector (~2.4 s per query at
         1M tiles, ~0.8 s per query in a batch).
  ivfpq  PCA-128 + inverted lists (~sqrt(N)) + 4-bit product-quantised codes, then exact
         re-ranking of the best candidates from the library's float16 copies: 40 bytes per
         tile in RAM; build trains on a sample (1.5-2 min) and adds ~13-23k tiles/s;
         nprobe and the re-ranking depth are tuned after each build for recall@100 >= 0.95
         (aiming at 0.97; 0.99 measured); ~50-65 ms per query at 1-3M tiles.
  hnsw   graph search (IndexHNSWFlat, M=32): ~4.3 KiB per tile in RAM, low latency at
         moderate size, slowest build; efSearch tuned like nprobe; removal rebuilds the graph.
  auto   flat while the float32 vectors fit 8 GiB (~2M tiles at 1024-d), ivfpq beyond; an
         auto library switches kind when `gpfm index add` / `remove` cross that size.
Every library also keeps float16 copies of its vectors (2 KiB per tile at 1024-d) so it can
re-rank, re-tune and rebuild without the stores."""


def register(sub) -> None:
    p = sub.add_parser(
        "index",
        help="a searchable library of many slides' tile embeddings (faiss)",
        description="Build, change, inspect and search a library of tile embeddings of many "
        "slides (one encoder, one tiling).",
    )
    cmds = p.add_subparsers(dest="index_command", metavar="ACTION")
    p.set_defaults(func=lambda args: _usage(p))

    b = cmds.add_parser(
        "build", help="make a library from embedding stores",
        description="Make a library from embedding stores (.zarr made by `gpfm embed`), or "
        "folders holding them.", epilog=KIND_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("stores", nargs="+", metavar="STORES", help="stores or folders of stores")
    b.add_argument("--out", required=True, metavar="LIB", help="library folder to create")
    b.add_argument("--kind", default="auto", choices=("auto", "flat", "ivfpq", "hnsw"),
                   help="index kind (default auto; see below)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing library")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=run_build, interrupted=ALL_OR_NOTHING)

    a = cmds.add_parser("add", help="add (or refresh) stores in a library",
                        description="Add stores to a library; a slide already in it is "
                        "replaced by the store given (this refreshes a changed store).")
    a.add_argument("library", metavar="LIB")
    a.add_argument("stores", nargs="+", metavar="STORES", help="stores or folders of stores")
    a.add_argument("--quiet", action="store_true", help="no progress lines")
    a.set_defaults(func=run_add, interrupted=ALL_OR_NOTHING)

    r = cmds.add_parser("remove", help="remove slides from a library")
    r.add_argument("library", metavar="LIB")
    r.add_argument("slides", nargs="+", metavar="SLIDE",
                   help="slide path, file name, fingerprint (8+ characters) or store path")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.set_defaults(func=run_remove, interrupted=ALL_OR_NOTHING)

    i = cmds.add_parser("info", help="what a library holds, and whether its slides are current")
    i.add_argument("library", metavar="LIB")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.add_argument("--no-check", action="store_true",
                   help="do not open the stores and slides to check they are unchanged")
    i.set_defaults(func=run_info)

    s = cmds.add_parser(
        "search", help="find the tiles of all slides most similar to a region or an image",
        description="Query with the mean embedding of a region of a store (--store, --roi) "
        "or with an image embedded by the library's encoder (--image).",
    )
    s.add_argument("library", metavar="LIB")
    s.add_argument("--store", help="embedding store of the slide holding the query region")
    s.add_argument("--roi", help="query region in level-0 pixels: x,y,w,h (or x,y: one tile)")
    s.add_argument("--image", help="query image file (PNG, JPEG, TIFF) showing tissue at the "
                   "library's magnification")
    s.add_argument("--weights", help="weights file of the library's encoder, for --image "
                   "(default: the file the stores were embedded with)")
    s.add_argument("--device", default="auto", help="device for --image: auto, cuda, mps, cpu")
    s.add_argument("--top-k", type=int, default=50,
                   help="tiles to return (with --per-slide: slides to return); default 50")
    s.add_argument("--per-slide", type=int, default=None, metavar="N",
                   help="group by slide: the best N regions of each of the best slides")
    s.add_argument("--include-query", action="store_true",
                   help="keep the query region's own tiles in the results")
    s.add_argument("--no-check", action="store_true",
                   help="skip checking that the library's stores and slides are unchanged")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the hits as JSON")
    out.add_argument("--out", help="write the hits to a CSV file")
    s.set_defaults(func=run_search)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _progress(args):
    if getattr(args, "quiet", False):
        return None
    return lambda message: print(message, file=sys.stderr, flush=True)


def run_build(args) -> int:
    from napari_gpfm.library import LibraryIndex

    library = LibraryIndex.build(args.stores, args.out, kind=args.kind,
                                 overwrite=args.overwrite, progress=_progress(args))
    print(f"built {library.path}: {len(library.slides)} slides, {len(library)} tiles, "
          f"{library.engine.config.describe()}")
    return 0


def run_add(args) -> int:
    from napari_gpfm.library import LibraryIndex

    library = LibraryIndex.open(args.library, verify=False)
    done = library.add(args.stores, progress=_progress(args))
    print(f"added {len(done['added'])} slides, refreshed {len(done['replaced'])}: "
          f"{len(library.slides)} slides, {len(library)} tiles, "
          f"{library.engine.config.describe()}")
    return 0


def run_remove(args) -> int:
    from napari_gpfm.library import LibraryIndex

    library = LibraryIndex.open(args.library, verify=False)
    gone = library.remove(args.slides, progress=_progress(args))
    for path in gone:
        print(f"removed {path}")
    print(f"{len(library.slides)} slides, {len(library)} tiles left")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def run_info(args) -> int:
    from napari_gpfm.library import LibraryIndex

    library = LibraryIndex.open(args.library, verify=False)
    info = library.info(check=not args.no_check)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"library    {info['path']}")
    print(f"encoder    {info['encoder_name']} ({info['encoder_id']}, {info['embed_dim']}-d, "
          f"pooling {info['pooling']})")
    print(f"tiling     {info['tiling_id']} (target {info['target_mpp']} um/px)")
    print(f"index      {info['engine_summary']}")
    print(f"size       {info['n_slides']} slides, {info['n_vectors']} tiles; index "
          f"{_size(info['index_bytes'])}, all files {_size(info['disk_bytes'])}")
    if info["suggested_kind"] != info["kind"]:
        print(f"note       at this size `--kind auto` would choose {info['suggested_kind']}: "
              f"rebuild with `gpfm index build ... --overwrite`")
    for s in info["slides"]:
        print(f"  {s['fingerprint'][:12]}  {s['tiles']:>8}  {s['status']:<14} {s['path']}")
    for s in info["slides"]:
        if s["status"] == "slide changed":
            print(f"note       {Path(s['path']).name} changed since it was embedded: "
                  f"`gpfm embed {s['path']} --out {Path(s['store']).parent.parent} "
                  f"--overwrite` (with its embedding options), then "
                  f"`gpfm index add {info['path']} {s['store']}`")
    return 0


def _search(args, library):
    """The hits and a description of the query (an image, or a store + region)."""
    from napari_gpfm.library.query import SearchOptions, search_roi, search_vector

    if args.image and (args.store or args.roi):
        raise ParameterError("give either --image, or --store with --roi, not both")
    options = SearchOptions(top_k=args.top_k, per_slide=args.per_slide,
                            include_query=args.include_query)
    if args.image:
        image = _read_image(args.image)
        vector = library.query_from_image(image, weights=args.weights, device=args.device)
        return search_vector(library, vector, options), {"image": str(Path(args.image).resolve())}
    if not (args.store and args.roi):
        raise ParameterError("give a query: --store STORE --roi x,y,w,h, or --image FILE")
    from napari_gpfm.cli._common import open_store, parse_roi, roi_on_slide

    roi = roi_on_slide(parse_roi(args.roi), open_store(Path(args.store).expanduser()))
    hits = search_roi(library, args.store, roi, options)
    return hits, {"store": str(Path(args.store).resolve()), "roi": list(roi.bounds)}


def _read_image(path: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ParameterError(f"--image {p}: no such file")
    if p.suffix.lower() in (".tif", ".tiff"):
        # tifffile first, the slide reader's own decoder: Pillow's libtiff cannot decode some
        # JPEG-in-TIFF (e.g. OME-TIFF crops of slides) and prints its complaints to stderr.
        image = _read_tiff(p)
        if image is not None:
            return image
    try:
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ParameterError(f"--image {p} is not a readable image ({exc})") from None


def _read_tiff(path: Path):
    """The first image of a TIFF as RGB uint8 (H, W, 3), or None if it is not one."""
    import numpy as np
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if series.axes not in ("YXS", "YX") or series.dtype != np.uint8:
                return None
            arr = series.asarray()
    except Exception:  # tifffile raises many kinds for files it cannot decode
        return None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3]) if arr.shape[2] >= 3 else None


COLUMNS = ("rank", "slide_rank", "score", "slide_name", "slide_fingerprint", "tile", "x", "y",
           "w", "h", "slide_path", "store_path")


def run_search(args) -> int:
    from napari_gpfm.library import LibraryIndex

    library = LibraryIndex.open(args.library, verify=not args.no_check)
    hits, query = _search(args, library)
    rows = [{c: h.to_dict()[c] for c in COLUMNS} for h in hits]
    if args.json:
        print(json.dumps({"library": str(library.path), "query": query, "hits": rows}, indent=2))
        return 0
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} hits to {out}")
        return 0
    if not rows:
        print("no hits")
        return 0
    # The slide's own rank among the slides exists with --per-slide only: no empty column.
    per_slide = any(r["slide_rank"] is not None for r in rows)
    within = f" {'slide#':>8}" if per_slide else ""
    print(f"{'rank':>4}{within} {'score':>7}  {'x':>9} {'y':>9} {'w':>6}  slide")
    for r in rows:
        within = f" {r['slide_rank']:>8}" if per_slide else ""
        print(f"{r['rank']:>4}{within} {r['score']:7.4f}  {r['x']:9.0f} {r['y']:9.0f} "
              f"{r['w']:6.0f}  {r['slide_name']}")
    return 0
