"""Cohort embedding: the slides of a manifest embedded across devices and nodes.

``gpfm-train embed MANIFEST --model NAME --devices N --num-nodes M`` runs Lightning's predict
loop on every rank. The slides are assigned to ranks up front (largest first, each to the rank
with the fewest tiles so far; the same deterministic plan on every rank), so **each slide is
written by exactly one rank**. On its rank a slide goes through exactly what ``gpfm embed``
does (``napari_gpfm``'s ``open_slide`` -> ``make_grid`` -> ``default_store_path`` ->
``prepare_store`` -> ``embed_slide``), so the stores are identical to ``gpfm embed``'s:

* a complete store is skipped, a partial one resumes from its ``done`` rows;
* a slide that fails (unreadable file, store of another identity...) is recorded in
  ``<out>/_cohort/failures-rank<R>.json`` and the rank continues with its next slide;
* after the loop every rank writes ``<out>/_cohort/outcomes-rank<R>.json``; rank 0 prints the
  summary of all ranks.

Launch on one machine with ``--devices N`` (Lightning starts the processes), on a cluster with
``srun`` (SLURM) or ``torchrun`` and ``--num-nodes``; see ``gpfm-train embed --help``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from napari_gpfm.errors import ConfigError, ParameterError, first_line

REPORT_DIR = "_cohort"


@dataclass(frozen=True)
class CohortSlide:
    """One slide of the cohort: its path, the level-0 um/px override and a size estimate."""

    path: Path
    mpp: float | None
    n_tiles: int


@dataclass(frozen=True)
class CohortOptions:
    """What every slide is embedded with (the ``gpfm embed`` options)."""

    out: Path
    model: str = "default"
    weights: str | None = None
    models_dir: str | None = None
    mpp: float | None = None
    slide_mpp: float | None = None  # level-0 um/px for slides whose file and row record none
    read_size: int | None = None
    stride: int | None = None
    min_tissue: float = 0.5
    batch_size: int = 64
    workers: int = 2
    precision: str = "auto"
    pooling: str = "cls"
    dtype: str | None = None  # None: float16 for new stores, any for existing ones
    patch_tokens: bool = False
    overwrite: bool = False
    limit: int | None = None


@dataclass
class SlideOutcome:
    """What happened to one slide on its rank."""

    slide: str
    status: str  # done, partial, skipped, failed
    rank: int
    tiles: int | None = None
    computed: int = 0
    seconds: float = 0.0
    store: str | None = None
    error: str | None = None


def read_cohort(
    manifest: str | os.PathLike, root: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
) -> list[CohortSlide]:
    """The slides of a slide manifest CSV (optionally only some splits).

    Two slides whose file names share a stem would share a store folder (``<out>/<stem>/``) and
    are refused.
    """
    from gpfm_train.data.manifests import load_slide_manifest, manifest_kind, resolve_slide_path
    from napari_gpfm.embedding.store import shared_store_folder, slide_stem

    path = Path(manifest).expanduser()
    kind = manifest_kind(path)
    if kind != "slides":
        raise ConfigError(
            f"{path} is a {kind} file; gpfm-train embed takes a slide manifest CSV "
            "(gpfm-train manifest build)"
        )
    rows = load_slide_manifest(path)
    if splits:
        rows = [r for r in rows if r.split in splits]
        if not rows:
            raise ConfigError(f"{path} has no slide with split in {list(splits)}")
    slides = [
        CohortSlide(resolve_slide_path(r.slide_path, root), r.mpp, int(r.n_tiles)) for r in rows
    ]
    clash = shared_store_folder(s.path for s in slides)
    if clash:
        raise ConfigError(
            f"{path}: {clash[0]} and {clash[1]} would share the store folder "
            f"'{slide_stem(clash[0])}'; rename one of them or embed them into different --out "
            "folders"
        )
    return slides


def assign_slides(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Slide indices per rank: largest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic, so every rank computes the same plan without talking to the others.
    """
    if world_size < 1:
        raise ParameterError(f"world size {world_size} must be at least 1")
    loads = [0] * world_size
    plan: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(len(sizes)), key=lambda i: (-max(int(sizes[i]), 1), i))
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        plan[rank].append(i)
        loads[rank] += max(int(sizes[i]), 1)
    return [sorted(p) for p in plan]


def tiling_kwargs(options: CohortOptions, encoder: Any) -> dict[str, Any]:
    """The ``TilingSpec`` arguments ``gpfm embed`` derives from the same options."""
    spec = encoder.spec
    return {
        "mpp": options.mpp if options.mpp is not None else spec.native_mpp,
        "read_size": options.read_size if options.read_size is not None
        else spec.native_read_size,
        "model_size": spec.input_size,
        "stride": options.stride,
        "min_tissue": options.min_tissue,
    }


def embed_one_slide(slide: CohortSlide, encoder: Any, options: CohortOptions,
                    rank: int = 0) -> SlideOutcome:
    """Embed one slide into its store exactly as ``gpfm embed`` does; never raises for the
    slide's own problems (they become a ``failed`` outcome)."""
    t0 = time.perf_counter()
    try:
        return _embed(slide, encoder, options, rank, t0)
    except Exception as exc:  # one slide must not stop the cohort
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return SlideOutcome(
            str(slide.path), "failed", rank, seconds=time.perf_counter() - t0,
            error=f"{type(exc).__name__}: {message}"[:500],
        )


def _embed(slide: CohortSlide, encoder: Any, options: CohortOptions, rank: int,
           t0: float) -> SlideOutcome:
    from napari_gpfm.embedding import EmbeddingStore, default_store_path
    from napari_gpfm.embedding.engine import check_store_dtype, embed_slide, prepare_store
    from napari_gpfm.embedding.store import encoder_metadata
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    with open_slide(slide.path, mpp=slide.mpp, default_mpp=options.slide_mpp) as opened:
        spec = TilingSpec(**tiling_kwargs(options, encoder))
        store_path = default_store_path(options.out, opened, encoder.spec.name, spec)
        if store_path.exists() and not options.overwrite:
            expected = EmbeddingStore.identity_of(
                slide=opened, encoder_meta=encoder_metadata(encoder), spec=spec,
                pooling=options.pooling,
            )
            existing = EmbeddingStore.open(store_path, expected)
            check_store_dtype(existing, options.dtype)
            if existing.is_complete and (existing.has_patch_tokens or not options.patch_tokens):
                return SlideOutcome(str(slide.path), "skipped", rank, existing.n_tiles, 0,
                                    time.perf_counter() - t0, str(store_path))
        grid = make_grid(opened, spec)
        store = prepare_store(
            store_path, slide=opened, grid=grid, encoder=encoder, spec=spec,
            pooling=options.pooling, dtype=options.dtype, patch_tokens=options.patch_tokens,
            overwrite=options.overwrite,
        )
        result = embed_slide(
            opened, grid, encoder, store, device=encoder.device,
            batch_size=options.batch_size, num_workers=options.workers,
            patch_tokens=options.patch_tokens, precision=options.precision, limit=options.limit,
        )
    status = "done" if result.complete else "partial"
    return SlideOutcome(str(slide.path), status, rank, result.total, result.computed,
                        time.perf_counter() - t0, str(result.store_path))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _first_item(batch: list[int]) -> int:
    return batch[0]


class CohortEmbedder(pl.LightningModule):
    """Predict-loop module: each ``predict_step`` embeds one slide of this rank's share.

    Args:
        slides: the whole cohort (every rank gets the same list).
        encoder: a loaded ``napari_gpfm`` encoder (registered as a submodule, so Lightning
            places it on this rank's device).
        options: the embedding options.
    """

    def __init__(self, slides: Sequence[CohortSlide], encoder: Any,
                 options: CohortOptions) -> None:
        super().__init__()
        if not slides:
            raise ConfigError("the cohort has no slide to embed")
        self.slides = list(slides)
        self.encoder = encoder
        self.options = options
        self.outcomes: list[SlideOutcome] = []
        self.summary: list[SlideOutcome] = []

    @property
    def report_dir(self) -> Path:
        return Path(self.options.out) / REPORT_DIR

    def my_slides(self) -> list[int]:
        """Indices of the slides this rank embeds."""
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        return assign_slides([s.n_tiles for s in self.slides], world)[rank]

    def predict_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        return DataLoader(self.my_slides(), batch_size=1, shuffle=False, num_workers=0,
                          collate_fn=_first_item)

    def on_predict_start(self) -> None:
        self.outcomes = []
        failures = self.report_dir / f"failures-rank{self.global_rank}.json"
        if failures.exists():
            failures.unlink()  # a resumed run reports only what fails this time

    def predict_step(self, batch: int, batch_idx: int) -> dict[str, Any]:
        outcome = embed_one_slide(self.slides[int(batch)], self.encoder, self.options,
                                  self.global_rank)
        self.outcomes.append(outcome)
        if outcome.status == "failed":
            failed = [asdict(o) for o in self.outcomes if o.status == "failed"]
            _write_json(self.report_dir / f"failures-rank{self.global_rank}.json", failed)
        return asdict(outcome)

    def on_predict_end(self) -> None:
        _write_json(self.report_dir / f"outcomes-rank{self.global_rank}.json",
                    [asdict(o) for o in self.outcomes])
        self.trainer.strategy.barrier("gpfm-cohort-outcomes")
        self.summary = collect_outcomes(self.report_dir, self.trainer.world_size)


def collect_outcomes(report_dir: Path, world_size: int) -> list[SlideOutcome]:
    """Every rank's outcomes of the last run, in slide order."""
    outcomes = []
    for rank in range(world_size):
        path = report_dir / f"outcomes-rank{rank}.json"
        if path.is_file():
            outcomes += [SlideOutcome(**o) for o in json.loads(path.read_text("utf-8"))]
    return sorted(outcomes, key=lambda o: o.slide)


def summary_table(outcomes: Sequence[SlideOutcome]) -> str:
    """The end-of-run table (one line per slide, then the counts)."""
    if not outcomes:
        return "no slide was embedded"
    names = [Path(o.slide).name for o in outcomes]
    width = max(5, *(len(n) for n in names))
    lines = [f"{'slide':<{width}}  {'rank':>4}  {'status':<8}  {'tiles':>7}  {'new':>7}  "
             f"{'time':>8}  details"]
    for name, o in zip(names, outcomes, strict=True):
        tiles = "-" if o.tiles is None else str(o.tiles)
        detail = o.error if o.status == "failed" else (o.store or "")
        lines.append(f"{name:<{width}}  {o.rank:>4}  {o.status:<8}  {tiles:>7}  "
                     f"{o.computed:>7}  {o.seconds:>6.1f} s  {detail}")
    failed = sum(o.status == "failed" for o in outcomes)
    lines.append(f"{len(outcomes)} slide(s): {len(outcomes) - failed} ok, {failed} failed")
    return "\n".join(lines)


@dataclass
class CohortRun:
    """What :func:`run_cohort` returns on each rank."""

    rank: int
    world_size: int
    outcomes: list[SlideOutcome] = field(default_factory=list)
    summary: list[SlideOutcome] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: the tiles finished so far are in their stores

    @property
    def failed(self) -> int:
        return sum(o.status == "failed" for o in self.summary)


def run_cohort(
    slides: Sequence[CohortSlide],
    options: CohortOptions,
    *,
    accelerator: str = "cpu",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str | None = None,
) -> CohortRun:
    """Embed ``slides`` on ``devices x num_nodes`` ranks (see the module docstring).

    The encoder is loaded on every rank (weights errors stop the run before any slide).
    """
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.tiling import TilingSpec

    if accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise ParameterError(f"--accelerator {accelerator!r}: use cpu, gpu or auto")
    if options.batch_size < 1 or options.workers < 0:
        raise ParameterError("--batch-size must be at least 1 and --workers at least 0")
    encoder = load_encoder(options.model, weights=options.weights, device="cpu",
                           models_dir=options.models_dir)
    TilingSpec(**tiling_kwargs(options, encoder))  # bad tiling values fail before launching
    if devices < 1 or num_nodes < 1:
        raise ParameterError(f"--devices {devices} and --num-nodes {num_nodes} must be >= 1")
    world = devices * num_nodes
    if strategy is None:
        strategy = "ddp" if world > 1 else "auto"
    try:
        trainer = pl.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
            precision="32-true", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
            inference_mode=True,
        )
    except Exception as exc:  # Lightning's MisconfigurationException: no such GPU, backend...
        raise ParameterError(
            f"--accelerator {accelerator} --devices {devices} --num-nodes {num_nodes}: "
            f"{first_line(exc)}"
        ) from None
    module = CohortEmbedder(slides, encoder, options)
    on_interrupt = signal.getsignal(signal.SIGINT)
    try:
        trainer.predict(module, return_predictions=False)
    except SystemExit:
        # Lightning answers Ctrl-C by tearing the run down, ignoring SIGINT from then on, and
        # calling sys.exit(1); the finished batches are already in the stores, so the caller
        # says so and exits 130, and a caller that goes on (a notebook) gets Ctrl-C back.
        if not trainer.interrupted:
            raise
        if on_interrupt is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_interrupt)
        return CohortRun(trainer.global_rank, trainer.world_size, module.outcomes,
                         module.summary, interrupted=True)
    return CohortRun(trainer.global_rank, trainer.world_size, module.outcomes, module.summary)


__all__ = [
    "CohortEmbedder",
    "CohortOptions",
    "CohortRun",
    "CohortSlide",
    "SlideOutcome",
    "assign_slides",
    "collect_outcomes",
    "embed_one_slide",
    "read_cohort",
    "run_cohort",
    "summary_table",
]
