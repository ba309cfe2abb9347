"""Tile datasets for pretraining, and the multi-crop wrapper the sampler and collate expect.

* :class:`SlideTileDataset` reads tiles straight from whole-slide images through
  :mod:`napari_gpfm.slides` (no JPEG dump). Slides open lazily in each DataLoader worker and
  stay open in a small per-process cache.
* :class:`TileFolderDataset` reads tile images (PNG/JPEG/TIFF) from a folder tree.
* :class:`MultiCropDataset` applies the seeded multi-crop augmentation to either.

Both tile datasets return ``(H, W, 3)`` uint8 arrays. With ``on_error="skip"`` a tile that
cannot be read (its slide is missing, truncated or corrupted) is logged once per slide and
replaced by the tile at the same offset in the next readable slide (or the next readable image),
so batches keep their size and the substitution is the same in every worker; ``"raise"`` raises.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_train.data.manifests import SlideRow, TileRow, resolve_slide_path
from napari_gpfm.errors import ConfigError, GPFMError, ParameterError, SlideError

_log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class NoTilesError(ConfigError):
    """Every slide of a dataset failed (and was skipped) or had no tissue tile."""


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ParameterError(f"on_error={on_error!r} must be 'skip' or 'raise'")
    return on_error


class SlideTileDataset:
    """Tissue tiles read from whole-slide images.

    Args:
        items: tile manifest rows (:class:`TileRow`: coordinates given), or slides to tile with
            ``spec``: slide manifest rows (:class:`SlideRow`, whose ``spec_id`` must be
            ``spec.id``) or slide paths.
        spec: a ``napari_gpfm.tiling.TilingSpec``; needed for slides, ignored for tile rows.
        root: base of relative slide paths (default: the current directory).
        default_mpp: level-0 um/px for slides (given as paths) whose file records none.
        exclude_regions: level-0 ``(M, 2)`` polygons whose tiles are left out of every slide
            tiled here (e.g. the labelled regions of an evaluation, so that pretraining never
            sees their pixels): a tile is dropped when its box, grown by
            ``exclude_margin_um`` on every side, shares any area with one of them.
        on_error: ``"skip"`` or ``"raise"`` when a slide cannot be opened or read.
        max_open_slides: slides kept open per process.

    Slides given as rows or paths are tiled here (tissue detection, in the calling process); a
    slide that fails then is skipped (``"skip"``) or raises. :meth:`tile_rows` returns the
    resulting tiles, to save as a tile manifest and skip the tiling next time.
    """

    def __init__(
        self,
        items: Sequence[TileRow] | Sequence[SlideRow] | Sequence[str | os.PathLike],
        spec: Any = None,
        *,
        root: str | os.PathLike | None = None,
        default_mpp: float | None = None,
        exclude_regions: Sequence[np.ndarray] = (),
        exclude_margin_um: float = 0.0,
        on_error: str = "skip",
        max_open_slides: int = 16,
    ) -> None:
        self.on_error = _check_on_error(on_error)
        if exclude_margin_um < 0:
            raise ParameterError(f"exclude_margin_um={exclude_margin_um} must be 0 or more")
        self._exclude = [np.asarray(p, dtype=np.float64) for p in exclude_regions]
        self._exclude_margin_um = float(exclude_margin_um)
        if max_open_slides < 1:
            raise ParameterError(f"max_open_slides={max_open_slides} must be at least 1")
        self.max_open_slides = int(max_open_slides)
        self.root = root
        items = list(items)
        if not items:
            raise ConfigError("SlideTileDataset got no slides or tiles; the manifest is empty")
        self._paths: list[Path] = []
        self._open_mpp: list[float | None] = []
        starts: list[int] = []
        xy: list[np.ndarray] = []
        size_l0: list[np.ndarray] = []
        read: list[np.ndarray] = []
        target_mpp: list[np.ndarray] = []
        if all(isinstance(it, TileRow) for it in items):
            groups: dict[str, list[TileRow]] = {}
            for row in items:
                groups.setdefault(row.slide_path, []).append(row)
            for slide_path, rows in groups.items():
                starts.append(sum(len(a) for a in xy))
                self._paths.append(resolve_slide_path(slide_path, root))
                # The manifest defines the geometry: open the slide at the pixel size its rows
                # imply, so a tile spans exactly tile_size_l0 level-0 pixels.
                self._open_mpp.append(rows[0].slide_mpp)
                xy.append(np.array([(r.x, r.y) for r in rows], dtype=np.int64))
                size_l0.append(np.array([r.tile_size_l0 for r in rows], dtype=np.float64))
                read.append(np.array([r.read_size for r in rows], dtype=np.int64))
                target_mpp.append(np.array([r.mpp for r in rows], dtype=np.float64))
        elif any(isinstance(it, TileRow) for it in items):
            raise ConfigError("SlideTileDataset items mix tile rows with slides; pass one kind")
        else:
            if spec is None:
                raise ParameterError("SlideTileDataset needs a TilingSpec (spec=) to tile slides")
            for item in items:
                grid, path, mpp = self._tile_slide(item, spec, default_mpp)
                if grid is None or len(grid) == 0:
                    continue
                starts.append(sum(len(a) for a in xy))
                self._paths.append(path)
                self._open_mpp.append(mpp)
                n = len(grid)
                xy.append(grid.coords)
                size_l0.append(np.full(n, grid.tile_size_l0, dtype=np.float64))
                read.append(np.full(n, spec.read_size, dtype=np.int64))
                target_mpp.append(np.full(n, spec.mpp, dtype=np.float64))
        if not xy:
            raise NoTilesError(
                "no tissue tile: every slide failed (see the warnings above) or had no tissue"
            )
        self._xy = np.concatenate(xy)
        self._size_l0 = np.concatenate(size_l0)
        self._read = np.concatenate(read)
        self._mpp = np.concatenate(target_mpp)
        self._starts = np.array(starts + [len(self._xy)], dtype=np.int64)
        self._bad: set[int] = set()
        self._slides: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    # ------------------------------------------------------------------ construction
    def _tile_slide(self, item: Any, spec: Any, default_mpp: float | None):
        from napari_gpfm.slides import open_slide
        from napari_gpfm.tiling import make_grid
        from napari_gpfm.tiling.grid import upsamples

        if isinstance(item, SlideRow):
            if item.spec_id != spec.id:
                raise ConfigError(
                    f"slide manifest row {item.slide_path} was counted with tiling spec "
                    f"{item.spec_id}, but the dataset uses spec {spec.id}; rebuild the manifest "
                    "with this spec (gpfm-train manifest build)"
                )
            path, mpp = resolve_slide_path(item.slide_path, self.root), item.mpp
        else:
            path, mpp = resolve_slide_path(item, self.root), None
        try:
            slide = open_slide(path, mpp=mpp)
            try:
                if not slide.has_mpp and default_mpp is not None:
                    slide.close()
                    mpp = float(default_mpp)
                    slide = open_slide(path, mpp=mpp)
                if slide.has_mpp and upsamples(slide.mpp, spec.mpp):
                    # make_grid's own refusal speaks the CLI's --mpp; a run config fixes it
                    # with a source of the slide's own.
                    raise ParameterError(
                        f"{path} is scanned at {slide.mpp:.3g} um/px, coarser than the tiling's "
                        f"{spec.mpp:g} um/px: its tiles would be upsampled, inventing detail. "
                        "Give it a source of its own that reads it at its scale "
                        f"(data.sources[i].tiling: {{mpp: {slide.mpp:.3g}, ...}}), or tile every "
                        "source coarser (data.tiling.mpp)"
                    )
                grid = make_grid(slide, spec)
            finally:
                slide.close()
            grid = self._without_excluded(grid)
        except Exception as exc:
            if self.on_error == "raise":
                if isinstance(exc, GPFMError):
                    raise
                raise SlideError(f"cannot tile {path}: {type(exc).__name__}: {exc}") from exc
            _log.warning("skipping slide %s: %s", path, exc)
            return None, path, mpp
        if isinstance(item, SlideRow) and item.n_tiles != len(grid):
            _log.warning(
                "%s: the manifest counts %d tiles, tiling now gives %d",
                path,
                item.n_tiles,
                len(grid),
            )
        return grid, path, mpp

    def _without_excluded(self, grid: Any) -> Any:
        if not self._exclude or len(grid) == 0:
            return grid
        from napari_gpfm.analysis.geometry import boxes_touching_polygon

        margin = self._exclude_margin_um / grid.slide_mpp
        boxes = grid.boxes() + np.array([-margin, -margin, margin, margin])
        dropped = np.zeros(len(grid), dtype=bool)
        for polygon in self._exclude:
            dropped |= boxes_touching_polygon(boxes, polygon)
        _log.info("%s: %d of %d tiles left out (they touch an excluded region)",
                  grid.slide_path, int(dropped.sum()), len(grid))
        return dataclasses.replace(grid, coords=grid.coords[~dropped],
                                   tissue_fraction=grid.tissue_fraction[~dropped])

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._xy)

    @property
    def n_slides(self) -> int:
        return len(self._paths)

    def slide_of(self, index: int) -> int:
        """Position of tile ``index``'s slide in :attr:`slide_paths`."""
        return int(np.searchsorted(self._starts, index, side="right") - 1)

    @property
    def slide_paths(self) -> list[Path]:
        return list(self._paths)

    def tile_rows(self) -> list[TileRow]:
        """The tiles as tile manifest rows (absolute slide paths)."""
        out = []
        for s, path in enumerate(self._paths):
            for i in range(self._starts[s], self._starts[s + 1]):
                out.append(
                    TileRow(
                        slide_path=str(path),
                        x=int(self._xy[i, 0]),
                        y=int(self._xy[i, 1]),
                        tile_size_l0=float(self._size_l0[i]),
                        mpp=float(self._mpp[i]),
                        read_size=int(self._read[i]),
                    )
                )
        return out

    def _slide(self, s: int):
        from napari_gpfm.slides import open_slide

        if os.getpid() != self._pid:  # a forked worker must not share the parent's handles
            self._slides = OrderedDict()
            self._pid = os.getpid()
        slide = self._slides.get(s)
        if slide is not None:
            self._slides.move_to_end(s)
            return slide
        slide = open_slide(self._paths[s], mpp=self._open_mpp[s])
        self._slides[s] = slide
        while len(self._slides) > self.max_open_slides:
            _, old = self._slides.popitem(last=False)
            old.close()
        return slide

    def _read_tile(self, index: int) -> np.ndarray:
        slide = self._slide(self.slide_of(index))
        size_l0 = float(self._size_l0[index])
        read_size = int(self._read[index])
        # Read at the resolution that maps read_size pixels onto size_l0 level-0 pixels.
        mpp = slide.mpp * size_l0 / read_size
        x, y = (int(v) for v in self._xy[index])
        return slide.read_region_mpp((x, y), read_size, mpp)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range 0..{len(self) - 1}")
        s = self.slide_of(index)
        offset = index - int(self._starts[s])
        for step in range(self.n_slides):
            t = (s + step) % self.n_slides
            if t in self._bad:
                continue
            n = int(self._starts[t + 1] - self._starts[t])
            tile_index = int(self._starts[t]) + offset % n
            try:
                return self._read_tile(tile_index)
            except Exception as exc:
                if self.on_error == "raise":
                    if isinstance(exc, GPFMError):
                        raise
                    raise SlideError(
                        f"cannot read tile {tile_index} of {self._paths[t]}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                self._forget(t, exc)
        raise SlideError(
            f"every one of the {self.n_slides} slides failed to read (first: {self._paths[0]}); "
            "check the files and the manifest paths"
        )

    def _forget(self, s: int, exc: BaseException) -> None:
        self._bad.add(s)
        old = self._slides.pop(s, None)
        if old is not None:
            old.close()
        _log.warning("skipping slide %s for the rest of this run: %s", self._paths[s], exc)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slides"] = OrderedDict()  # handles never travel to workers
        return state

    @property
    def open_slides(self) -> int:
        """How many slides this process holds open (at most ``max_open_slides``)."""
        return len(self._slides)

    def close(self) -> None:
        """Close this process's open slides; the next read opens its slide again."""
        while self._slides:
            _, slide = self._slides.popitem()
            slide.close()


class TileFolderDataset:
    """Tile images under ``root`` (an ImageFolder-like tree or a flat folder; labels ignored).

    Args:
        root: folder searched recursively for ``suffixes`` files (hidden files are ignored).
        suffixes: file endings to take (case-insensitive).
        on_error: ``"skip"`` (use the next readable image) or ``"raise"``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        suffixes: Sequence[str] = IMAGE_SUFFIXES,
        on_error: str = "skip",
    ) -> None:
        self.on_error = _check_on_error(on_error)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"tile folder not found: {self.root}")
        ends = tuple(s.lower() for s in suffixes)
        found = []
        for dirpath, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [
                Path(dirpath) / f
                for f in files
                if f.lower().endswith(ends) and not f.startswith(".")
            ]
        self.paths = sorted(found, key=lambda p: p.relative_to(self.root).as_posix())
        if not self.paths:
            raise ConfigError(
                f"{self.root} holds no tile images ({', '.join(ends)}); point it at a tile folder"
            )
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return np.asarray(img.convert("RGB"))

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range 0..{len(self) - 1}")
        for step in range(len(self)):
            i = (index + step) % len(self)
            if i in self._bad:
                continue
            try:
                return self._load(i)
            except Exception as exc:
                if self.on_error == "raise":
                    raise ConfigError(
                        f"cannot read tile image {self.paths[i]}: {type(exc).__name__}: {exc}"
                    ) from exc
                self._bad.add(i)
                _log.warning("skipping unreadable tile image %s: %s", self.paths[i], exc)
        raise ConfigError(f"no image under {self.root} could be read")


class MultiCropDataset:
    """A tile dataset seen through the seeded multi-crop augmentation.

    ``dataset[key]`` takes an index, or an ``(index, position)`` pair from
    ``InfiniteShardedSampler(with_positions=True)``, and returns ``{"global_crops": [...],
    "local_crops": [...], "index": i, "position": p, "seed": s}`` where the augmentation ran
    under ``s = sample_seed(seed, i, p)``.
    """

    def __init__(self, dataset: Any, augmentation: Any, seed: int = 0) -> None:
        if len(dataset) == 0:
            raise ConfigError("MultiCropDataset got an empty tile dataset")
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from gpfm_train.data.augment import sample_seed

        index, position = key if isinstance(key, tuple) else (key, 0)
        index, position = int(index), int(position)
        seed = sample_seed(self.seed, index, position)
        crops = self.augmentation(self.dataset[index], seed=seed)
        return {**crops, "index": index, "position": position, "seed": seed}
