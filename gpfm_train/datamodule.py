"""The Lightning data module of GPFM pretraining: tiles -> multi-crop + iBOT masks, endlessly.

Tiles come from one or more **sources**, concatenated in the order given:

* ``manifest``: a slide manifest CSV (slides tiled here with ``tiling``, through
  ``napari_gpfm``'s tissue detection and grid; the manifest's ``spec_id`` must match) or a tile
  manifest CSV (coordinates given; no tiling at start-up, the choice for large corpora);
* ``slides``: slide files listed directly (tiled with ``tiling``);
* ``tile_folder``: a folder tree of PNG/JPEG/TIFF tiles.

Relative paths resolve against the current directory (manifest slide paths against ``root``,
default the current directory too). A source may set its own ``tiling`` in place of the
section's: another magnification, or a coarser stride for a slide much larger than the others.

Each rank reads a disjoint shard of one infinite seeded stream
(:class:`~gpfm_train.data.sampler.InfiniteShardedSampler`, rank and world size from the
trainer); each sample's crops are seeded by its stream position and each batch's masks by its
samples, so any rank and any resume see the same data. The stream position is this module's
checkpoint state (:meth:`GPFMDataModule.state_dict`), derived from ``trainer.global_step``: a
resumed run continues at the exact sample where the uninterrupted run would have.

``on_error: skip`` replaces the tiles of a slide that fails mid-run by tiles of the next
readable slide and logs a warning naming the slide; ``raise`` stops the run. At setup, a slide
that cannot be tiled (unreadable, or a scan coarser than the tiling would upsample) is skipped
the same way, and a source left without tiles is dropped with a warning while another source
still gives tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from gpfm_train.data.augment import MultiCropConfig
from gpfm_train.data.collate import MaskConfig
from gpfm_train.module import _plain, config_dataclass
from napari_gpfm.errors import ConfigError, GPFMError

_log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


@dataclass(frozen=True)
class TilingOptions:
    """Tiles cut from slides: ``read_size`` px at ``mpp`` um/px (``napari_gpfm.tiling``)."""

    mpp: float = 0.5
    read_size: int = 224
    min_tissue: float = 0.5
    stride: int | None = None

    def spec(self) -> Any:
        """The ``TilingSpec`` (model size = read size, as ``gpfm-train manifest build`` makes)."""
        from napari_gpfm.tiling import TilingSpec

        return TilingSpec(
            mpp=self.mpp, read_size=self.read_size, model_size=self.read_size,
            stride=self.stride, min_tissue=self.min_tissue,
        )


@dataclass(frozen=True)
class SourceOptions:
    """One tile source; exactly one of ``manifest``, ``slides`` and ``tile_folder``.

    ``root`` is the base of relative slide paths in a manifest; ``splits`` the manifest splits
    used (a slide manifest's ``split`` column); ``default_mpp`` the level-0 um/px of listed
    slides that record none; ``tiling``, when given, replaces ``data.tiling`` for this source's
    slides (a tile folder has no tiling). ``exclude_regions``, a GeoJSON of level-0 polygons
    (QuPath's export) for a source of one listed slide, leaves out every tile that touches one
    of them, with ``exclude_margin_um`` to spare: hold a slide's labelled evaluation regions out
    of pretraining.
    """

    manifest: str | None = None
    slides: tuple[str, ...] = ()
    tile_folder: str | None = None
    root: str | None = None
    splits: tuple[str, ...] = ("train",)
    default_mpp: float | None = None
    tiling: TilingOptions | None = None
    exclude_regions: str | None = None
    exclude_margin_um: float = 0.0

    def __post_init__(self) -> None:
        given = [k for k in ("manifest", "slides", "tile_folder") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(
                "each data source needs exactly one of manifest, slides, tile_folder "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.tiling is not None and self.tile_folder:
            raise ConfigError(
                "a tile_folder source is read as it is and takes no tiling; remove its tiling "
                "or list slides instead"
            )
        if self.exclude_regions and len(self.slides) != 1:
            raise ConfigError(
                "exclude_regions holds one slide's level-0 polygons: give it to a source that "
                f"lists exactly one slide (this one is a {self.kind} source"
                + (f" of {len(self.slides)} slides)" if self.slides else ")")
            )
        if self.exclude_margin_um < 0:
            raise ConfigError(f"exclude_margin_um={self.exclude_margin_um} must be 0 or more")

    @property
    def kind(self) -> str:
        return next(k for k in ("manifest", "slides", "tile_folder") if getattr(self, k))


@dataclass(frozen=True)
class DataOptions:
    """The ``data`` section of a run config."""

    sources: tuple[SourceOptions, ...] = ()
    tiling: TilingOptions = field(default_factory=TilingOptions)
    batch_size: int = 96
    num_workers: int = 8
    seed: int = 0
    on_error: str = "skip"
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    max_open_slides: int = 16
    pin_memory: bool = True
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources lists no tile source; add a manifest, slides or "
                              "tile_folder")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"on_error={self.on_error!r} must be 'skip' or 'raise'")
        for name in ("batch_size", "max_open_slides", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} must be 0 or more")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be non-negative")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "data") -> DataOptions:
        """Build from the ``data`` section of a run config (strict keys and types)."""
        return config_dataclass(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


def _existing(path_text: str, where: str, what: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise ConfigError(
            f"config {where}: {what} not found: {path} (relative paths resolve against the "
            f"current directory, {Path.cwd()})"
        )
    return path


def _check_slide_files(rows: list, source: SourceOptions, options: DataOptions, where: str,
                       manifest: Path) -> None:
    """Every slide a manifest names must exist (``raise``), or at least one (``skip``)."""
    from gpfm_train.data.manifests import resolve_slide_path

    paths = {r.slide_path: resolve_slide_path(r.slide_path, source.root) for r in rows}
    missing = [p for p in paths.values() if not p.is_file()]
    if not missing:
        return
    base = f"relative paths resolve against {source.root or Path.cwd()}; set root: if needed"
    if len(missing) == len(paths):
        raise ConfigError(
            f"config {where}: none of the {len(paths)} slide(s) of {manifest} exists (first: "
            f"{missing[0]}); {base}"
        )
    if options.on_error == "raise":
        raise ConfigError(
            f"config {where}: {len(missing)} slide(s) of {manifest} do not exist (first: "
            f"{missing[0]}); fix the manifest or set data.on_error: skip"
        )
    _log.warning("%s: %d of %d slides do not exist and are skipped (first: %s)", manifest,
                 len(missing), len(paths), missing[0])


def _excluded_polygons(source: SourceOptions, where: str) -> list:
    """The polygons of ``source.exclude_regions`` (none when it names no file)."""
    if not source.exclude_regions:
        return []
    from napari_gpfm.analysis.geojson import read_geojson

    path = _existing(source.exclude_regions, f"{where}.exclude_regions", "GeoJSON file")
    try:
        return [a.polygon for a in read_geojson(path)]
    except GPFMError as exc:
        raise ConfigError(f"config {where}.exclude_regions: {exc}") from exc


def _source_dataset(source: SourceOptions, options: DataOptions, where: str, build: bool):
    """The tile dataset of one source (``build=False``: only check it, cheaply)."""
    from gpfm_train.data.datasets import SlideTileDataset, TileFolderDataset
    from gpfm_train.data.manifests import load_slide_manifest, load_tile_manifest, manifest_kind

    common = {"on_error": options.on_error, "max_open_slides": options.max_open_slides}
    tiling = source.tiling or options.tiling
    tiling_key = f"{where}.tiling" if source.tiling else "data.tiling"
    if source.kind == "tile_folder":
        folder = _existing(source.tile_folder, f"{where}.tile_folder", "tile folder")
        return TileFolderDataset(folder, on_error=options.on_error)  # lists files: cheap
    if source.kind == "slides":
        paths = [_existing(p, f"{where}.slides", "slide") for p in source.slides]
        excluded = _excluded_polygons(source, where)
        if not build:
            return None
        return SlideTileDataset(paths, tiling.spec(), default_mpp=source.default_mpp,
                                exclude_regions=excluded,
                                exclude_margin_um=source.exclude_margin_um, **common)
    path = _existing(source.manifest, f"{where}.manifest", "manifest")
    kind = manifest_kind(path)
    if kind == "sources":
        raise ConfigError(
            f"config {where}.manifest: {path} is a sources YAML; give a slide or tile manifest "
            "CSV (gpfm-train manifest build)"
        )
    rows = load_slide_manifest(path) if kind == "slides" else load_tile_manifest(path)
    if kind == "slides":
        rows = [r for r in rows if r.split in source.splits]
        if not rows:
            raise ConfigError(
                f"config {where}.manifest: {path} has no row with split in "
                f"{list(source.splits)}; change {where}.splits or the manifest"
            )
        spec_id = tiling.spec().id
        other = sorted({r.spec_id for r in rows} - {spec_id})
        if other:
            raise ConfigError(
                f"config {where}.manifest: {path} was counted with tiling spec {other[0]} but "
                f"{tiling_key} gives spec {spec_id}; use the tiling it was built with or rebuild "
                "it (gpfm-train manifest build --mpp/--size/--min-tissue)"
            )
    if not build:
        _check_slide_files(rows, source, options, f"{where}.manifest", path)
        return None
    return SlideTileDataset(rows, tiling.spec(), root=source.root,
                            default_mpp=source.default_mpp, **common)


class GPFMDataModule(pl.LightningDataModule):
    """Multi-crop batches for :class:`~gpfm_train.module.GPFMPretrainModule`, endlessly.

    Args:
        options: a :class:`DataOptions` or the ``data`` mapping of a run config.
    """

    def __init__(self, options: DataOptions | Mapping[str, Any]) -> None:
        super().__init__()
        self.options = (
            options if isinstance(options, DataOptions) else DataOptions.from_mapping(options)
        )
        self.save_hyperparameters(self.options.to_dict())
        self.tiles: Any = None
        self.sampler: Any = None
        self._base_position = 0
        self._base_step = 0
        self._pending_sampler_state: dict[str, Any] | None = None

    @property
    def batch_size(self) -> int:
        """Samples per device per step."""
        return self.options.batch_size

    def validate(self) -> None:
        """Check every source cheaply (paths, manifest rows, tiling spec) before a run starts."""
        for i, source in enumerate(self.options.sources):
            _source_dataset(source, self.options, f"data.sources[{i}]", build=False)

    def build_tiles(self) -> Any:
        """The concatenated tile dataset of all sources (slides are tiled here)."""
        from torch.utils.data import ConcatDataset

        from gpfm_train.data.datasets import NoTilesError

        parts = []
        for i, source in enumerate(self.options.sources):
            where = f"data.sources[{i}]"
            try:
                parts.append(_source_dataset(source, self.options, where, build=True))
            except NoTilesError as exc:
                # Under on_error: skip a source whose slides all failed goes the way of its
                # slides, as long as another source still gives tiles.
                if self.options.on_error == "raise" or len(self.options.sources) == 1:
                    raise NoTilesError(f"config {where}: {exc}") from None
                _log.warning("config %s gives no tile (%s); training goes on without it",
                             where, exc)
        if not parts:
            raise NoTilesError("config data.sources: no source gives a tile (see the warnings)")
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        from gpfm_train.data.sampler import InfiniteShardedSampler

        if self.tiles is None:
            self.tiles = self.build_tiles()
            _log.info("%d tiles from %d source(s)", len(self.tiles), len(self.options.sources))
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        self.sampler = InfiniteShardedSampler(
            len(self.tiles), seed=self.options.seed, rank=rank, world_size=world,
            with_positions=True,
        )
        if self._pending_sampler_state is not None:
            self.sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None

    def teardown(self, stage: str | None = None) -> None:
        # With num_workers=0 the slides are read, and held open, in this process: close them
        # when fit ends instead of leaving the handles to the garbage collector.
        for part in getattr(self.tiles, "datasets", [self.tiles]):
            close = getattr(part, "close", None)
            if close is not None:
                close()

    def train_dataloader(self) -> Any:
        import torch
        from torch.utils.data import DataLoader

        from gpfm_train.data.augment import MultiCropAugmentation
        from gpfm_train.data.collate import MultiCropCollator
        from gpfm_train.data.datasets import MultiCropDataset
        from gpfm_train.interrupt import ignore_interrupts_in_workers

        if self.sampler is None:
            self.setup("fit")
        opts = self.options
        dataset = MultiCropDataset(self.tiles, MultiCropAugmentation(opts.crops), seed=opts.seed)
        workers = opts.num_workers
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            batch_size=opts.batch_size,
            sampler=self.sampler,
            collate_fn=MultiCropCollator(opts.masks, seed=opts.seed),
            num_workers=workers,
            pin_memory=opts.pin_memory and on_gpu,
            drop_last=True,
            persistent_workers=workers > 0,
            prefetch_factor=opts.prefetch_factor if workers > 0 else None,
            worker_init_fn=ignore_interrupts_in_workers,
            # Its own generator: creating the iterator must not draw from the global RNG,
            # whose state a resumed run restores exactly.
            generator=torch.Generator().manual_seed(opts.seed),
        )

    # ------------------------------------------------------------------ checkpoint state
    def _position(self) -> int:
        step = self.trainer.global_step if self.trainer is not None else self._base_step
        world = self.trainer.world_size if self.trainer is not None else 1
        return self._base_position + (step - self._base_step) * self.options.batch_size * world

    def state_dict(self) -> dict[str, Any]:
        """The sampler stream position after the last optimizer step (and that step)."""
        if self.tiles is None:
            return {}
        step = self.trainer.global_step if self.trainer is not None else self._base_step
        return {
            "sampler": {
                "size": len(self.tiles),
                "seed": self.options.seed,
                "shuffle": True,
                "position": self._position(),
            },
            "global_step": int(step),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream where the checkpointed run stopped."""
        sampler_state = state_dict.get("sampler")
        if not sampler_state:
            return
        self._base_position = int(sampler_state["position"])
        self._base_step = int(state_dict.get("global_step", 0))
        if self.sampler is not None:
            self.sampler.load_state_dict(sampler_state)
        else:
            self._pending_sampler_state = dict(sampler_state)


__all__ = ["DataOptions", "GPFMDataModule", "SourceOptions", "TilingOptions"]
