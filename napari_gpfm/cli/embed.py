"""`gpfm embed SLIDE_OR_DIR... --model NAME`: tile embeddings of slides into resumable stores.

Each slide gets ``<out>/<slide stem>/<encoder>-<tiling id>.zarr``. A complete store is skipped,
an interrupted one resumes, one made with other inputs is refused (``--overwrite`` replaces
it). With several slides, one that fails does not stop the others: the run ends with a summary
table and exit code 1.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from napari_gpfm.cli._common import RESUMES, slide_pixel_size
from napari_gpfm.errors import GPFMError, ParameterError, SlideError

DEFAULT_OUT = "embeddings"


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed the tissue tiles of slides with an encoder (resumable zarr stores)",
        description="Embed the tissue tiles of one or more slides. Folders are expanded to the "
        "slide files they contain. Completed slides are skipped; interrupted ones resume.",
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE_OR_DIR",
                   help="slide files, or folders holding slide files")
    p.add_argument("--model", default="default",
                   help="encoder name (see `gpfm models`), or timm:<architecture> "
                   "(default: the embedded default model)")
    p.add_argument("--weights", default=None, help="weights file for the encoder")
    p.add_argument("--models-dir", default=None,
                   help="folder searched for weights files (default $GPFM_MODELS_DIR)")
    p.add_argument("--mpp", type=float, default=None,
                   help="target microns per pixel of the tiles (default: the encoder's native "
                   "resolution, 0.5 for GPFM)")
    p.add_argument("--read-size", type=int, default=None,
                   help="tile side read at --mpp, in pixels (default: the encoder's native "
                   "field of view, 256 for GPFM)")
    p.add_argument("--size", type=int, default=None,
                   help="model input side the tiles are resized to (default and only valid "
                   "value: the encoder's input size)")
    p.add_argument("--stride", type=int, default=None,
                   help="step between tiles in target pixels (default: --read-size, no overlap)")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="keep tiles with at least this tissue fraction (default 0.5)")
    p.add_argument("--slide-mpp", type=slide_pixel_size, default=None,
                   help="level-0 microns per pixel, for slides that do not record it")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute precision (auto: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per batch (default 64)")
    p.add_argument("--workers", type=int, default=2,
                   help="tile reading threads (default 2)")
    p.add_argument("--limit", type=int, default=None,
                   help="embed at most N more tiles per slide (a quick look; run again "
                   "without it to finish)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing stores instead of resuming them")
    p.add_argument("--patch-tokens", action="store_true",
                   help="also store every tile's patch tokens (large: ~0.5 MB a tile for ViT-L)")
    p.add_argument("--pooling", default="cls", choices=("cls", "mean", "cls+mean"),
                   help="tile embedding: the encoder's CLS output, the mean patch token, or both")
    p.add_argument("--dtype", default=None, choices=("float16", "float32"),
                   help="stored feature precision of new stores (default float16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--h5", action="store_true",
                   help="also export each finished store as a TRIDENT/CLAM-style .h5 file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, interrupted=RESUMES)


# ------------------------------------------------------------------------------ inputs
def expand_slides(items: list[str]) -> list[Path]:
    """Files as given, folders replaced by their slide files (sorted); duplicates dropped.

    A folder without slide files is skipped with a note when other inputs hold slides (as with
    ``folder/*/``, where some subfolders may hold none); alone, it is an error that names the
    subfolders that do hold slides.
    """
    from napari_gpfm.slides import SLIDE_SUFFIXES

    def slides_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES))

    out: list[Path] = []
    empty: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = slides_in(path)
            out.extend(found)
            if not found:
                empty.append(path)
        else:
            out.append(path)
    if empty and not out:
        path = empty[0]
        inner = [d for d in sorted(path.iterdir()) if d.is_dir() and slides_in(d)]
        where = (f"name the subfolders that hold slides: {' '.join(f'{d}/' for d in inner)}"
                 if inner else "nor do its subfolders")
        raise ParameterError(
            f"folder {path} holds no slide files ({', '.join(SLIDE_SUFFIXES)}); subfolders are "
            f"not searched: {where}"
        )
    for path in empty:
        print(f"note: {path} holds no slide files; skipped", file=sys.stderr)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _check_args(args) -> None:
    for flag, value, lo in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < lo:
            raise ParameterError(f"{flag} {value} must be at least {lo}")
    if args.limit is not None and args.limit < 1:
        raise ParameterError(f"--limit {args.limit} must be at least 1")


# ------------------------------------------------------------------------------ progress
class _LineProgress:
    """A progress line on stderr for when tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last < 0.5 and self.n < self.total:
            return
        self._last = now
        rate = self.n / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} tiles, {rate:.1f} tiles/s, "
                         f"ETA {eta_text}   ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _progress_bar(total: int, desc: str, quiet: bool):
    if quiet or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="tile", file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5)


# ------------------------------------------------------------------------------ the run
@dataclass
class SlideOutcome:
    """One row of the summary."""

    slide: Path
    status: str  # done, partial, skipped, failed
    tiles: int | None = None
    computed: int = 0
    seconds: float | None = None
    detail: str = ""


def _embed_one(path: Path, args, encoder, spec_kwargs: dict) -> SlideOutcome:
    from napari_gpfm.embedding import EmbeddingStore, default_store_path
    from napari_gpfm.embedding.engine import check_store_dtype, embed_slide, prepare_store
    from napari_gpfm.embedding.h5io import export_h5
    from napari_gpfm.embedding.store import encoder_metadata
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    try:
        slide = open_slide(path, default_mpp=args.slide_mpp)
    except OSError as exc:  # permissions, a vanished network share...
        raise SlideError(f"cannot read {path}: {exc.strerror or exc}") from None
    with slide:
        spec = TilingSpec(**spec_kwargs)
        store_path = default_store_path(args.out, slide, encoder.spec.name, spec)
        if store_path.exists() and not args.overwrite:
            expected = EmbeddingStore.identity_of(
                slide=slide, encoder_meta=encoder_metadata(encoder), spec=spec,
                pooling=args.pooling,
            )
            existing = EmbeddingStore.open(store_path, expected)
            check_store_dtype(existing, args.dtype)
            if existing.is_complete and (existing.has_patch_tokens or not args.patch_tokens):
                print(f"{path.name}: already complete: {store_path}")
                _export_if_asked(args, existing, export_h5)
                return SlideOutcome(path, "skipped", existing.n_tiles, 0, None,
                                    "already complete")
        grid = make_grid(slide, spec)
        store = prepare_store(
            store_path, slide=slide, grid=grid, encoder=encoder, spec=spec,
            pooling=args.pooling, dtype=args.dtype, patch_tokens=args.patch_tokens,
            overwrite=args.overwrite,
        )
        pending = store.n_tiles - store.n_done
        if args.limit is not None:
            pending = min(pending, args.limit)
        bar = _progress_bar(pending, slide.name, args.quiet)
        try:
            result = embed_slide(
                slide, grid, encoder, store, device=encoder.device,
                batch_size=args.batch_size, num_workers=args.workers,
                patch_tokens=args.patch_tokens, precision=args.precision,
                compile=args.compile, limit=args.limit,
                progress=(lambda p: bar.update(len(p.batch_indices))) if bar else None,
            )
        finally:
            if bar is not None:
                bar.close()
    if result.total == 0:
        why = (f"no tile has enough tissue (--min-tissue {args.min_tissue})" if grid.candidates
               else f"one tile ({grid.tile_size_l0:.0f} level-0 px) is larger than the slide; "
               "use a smaller --read-size or a coarser --mpp")
        print(f"{path.name}: {why}; empty store {result.store_path}")
        return SlideOutcome(path, "done", 0, 0, result.seconds, "no tissue tiles")
    resumed = f", {result.skipped} resumed" if result.skipped else ""
    rate = f"{result.tiles_per_s:.1f} tiles/s" if result.computed else "nothing to compute"
    print(
        f"{path.name}: {result.done}/{result.total} tiles ({result.computed} new{resumed}) "
        f"in {result.seconds:.1f} s, {rate} on {result.device} ({result.precision}) -> "
        f"{result.store_path}"
    )
    if result.oom_splits:
        print(f"{path.name}: ran out of GPU memory; continued at {result.micro_batch} "
              "tiles per forward pass (lower --batch-size next time)")
    if not result.complete:
        return SlideOutcome(path, "partial", result.total, result.computed, result.seconds,
                            f"{result.done}/{result.total} tiles; run again to finish")
    _export_if_asked(args, store, export_h5)
    return SlideOutcome(path, "done", result.total, result.computed, result.seconds,
                        str(result.store_path))


def _export_if_asked(args, store, export_h5) -> None:
    if args.h5:
        target = Path(store.path).with_suffix(".h5")
        export_h5(store, target)
        print(f"{Path(store.attrs.get('slide_name', '')).name or store.path}: wrote {target}")


def _print_summary(outcomes: list[SlideOutcome]) -> None:
    name_w = max(5, *(len(o.slide.name) for o in outcomes))
    print()
    print(f"{'slide':<{name_w}}  {'status':<8}  {'tiles':>7}  {'new':>7}  {'time':>8}  details")
    for o in outcomes:
        tiles = "-" if o.tiles is None else str(o.tiles)
        secs = "-" if o.seconds is None else f"{o.seconds:.1f} s"
        print(f"{o.slide.name:<{name_w}}  {o.status:<8}  {tiles:>7}  {o.computed:>7}  "
              f"{secs:>8}  {o.detail}")
    failed = sum(o.status == "failed" for o in outcomes)
    print(f"{len(outcomes)} slide(s): {len(outcomes) - failed} ok, {failed} failed")


def run(args) -> int:
    from napari_gpfm.embedding.engine import resolve_device
    from napari_gpfm.embedding.store import shared_store_folder
    from napari_gpfm.encoders import load_encoder

    _check_args(args)
    slides = expand_slides(args.slides)
    clash = shared_store_folder(slides)
    if clash:
        raise ParameterError(
            f"{clash[0]} and {clash[1]} have the same file name, so their stores would share one "
            "folder; embed them into different --out folders"
        )
    device = resolve_device(args.device)
    encoder = load_encoder(args.model, weights=args.weights, device=device,
                           models_dir=args.models_dir)
    espec = encoder.spec
    if args.size is not None and args.size != espec.input_size:
        raise ParameterError(
            f"--size {args.size}: encoder {espec.name!r} takes {espec.input_size} px inputs; "
            "omit --size or pass that value"
        )
    spec_kwargs = {
        "mpp": args.mpp if args.mpp is not None else espec.native_mpp,
        "read_size": args.read_size if args.read_size is not None else espec.native_read_size,
        "model_size": espec.input_size,
        "stride": args.stride,
        "min_tissue": args.min_tissue,
    }
    from napari_gpfm.tiling import TilingSpec

    TilingSpec(**spec_kwargs)  # bad tiling values fail once, before any slide is opened

    if len(slides) == 1:
        _embed_one(slides[0], args, encoder, spec_kwargs)
        return 0
    outcomes = []
    for path in slides:
        t0 = time.perf_counter()
        try:
            outcome = _embed_one(path, args, encoder, spec_kwargs)
        except (GPFMError, OSError) as exc:  # one slide's problem; the others go on
            print(f"error: {path.name}: {exc}", file=sys.stderr)
            outcome = SlideOutcome(path, "failed", None, 0, time.perf_counter() - t0, str(exc))
        outcomes.append(outcome)
    _print_summary(outcomes)
    return 1 if any(o.status == "failed" for o in outcomes) else 0
