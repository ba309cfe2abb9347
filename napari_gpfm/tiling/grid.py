"""Tile grids: which level-0 squares of a slide are read, at which physical resolution.

A :class:`TilingSpec` is pure data (target microns per pixel, read and model sizes, stride,
tissue rule) with a stable short ``id``: stores and caches record it so that embeddings made
with one tiling are never mixed with another's. :func:`make_grid` lays the spec over a slide,
row by row, keeps the tiles whose tissue fraction reaches ``min_tissue``, and returns a
:class:`TileGrid` of level-0 top-left corners.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_gpfm.errors import ConfigError, ParameterError
from napari_gpfm.tiling.tissue import TissueMask, TissueParams, detect_tissue

# Reading at a resolution finer than the scan would mean upsampling, i.e. inventing detail;
# a small margin allows the usual 0.2527 vs 0.25 um/px type of calibration differences.
MAX_UPSAMPLING = 1.10
TILE_SIDE_RANGE = (8, 8192)  # pixels, for read_size and model_size
_CSV_MAGIC = "# napari-gpfm tile grid v1"


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


@dataclass(frozen=True)
class TilingSpec:
    """How a slide is cut into tiles.

    ``mpp``: target microns per pixel; ``read_size``: tile side read at that resolution (the
    field of view is ``read_size * mpp`` microns); ``model_size``: side the encoder resizes to;
    ``stride``: step between tiles in target pixels (None = ``read_size``, no overlap);
    ``min_tissue``: keep tiles whose tissue fraction is at least this (0 keeps every tile).
    """

    mpp: float = 0.5
    read_size: int = 224
    model_size: int = 224
    stride: int | None = None
    min_tissue: float = 0.5
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        if not (_finite(self.mpp) and 0.01 <= self.mpp <= 100):
            raise ParameterError(f"--mpp {self.mpp!r}: the target pixel size must be 0.01-100 um/px")
        lo, hi = TILE_SIDE_RANGE
        for name, flag in (("read_size", "--read-size"), ("model_size", "--size")):
            v = getattr(self, name)
            if not (_is_int(v) and lo <= v <= hi):
                raise ParameterError(f"{flag} {v!r}: {name} must be a whole number of pixels "
                                     f"between {lo} and {hi}")
        if self.stride is not None and not (_is_int(self.stride) and 1 <= self.stride <= hi):
            raise ParameterError(f"--stride {self.stride!r}: the stride must be a whole number of "
                                 f"pixels between 1 and {hi}, or omitted (= the read size)")
        if not (_finite(self.min_tissue) and 0 <= self.min_tissue <= 1):
            raise ParameterError(f"--min-tissue {self.min_tissue!r}: must be a fraction in 0-1")
        if not isinstance(self.tissue, TissueParams):
            raise ParameterError(f"tissue={self.tissue!r} must be a TissueParams")
        # Normalise numbers so that equal specs compare (and hash) equal.
        object.__setattr__(self, "mpp", float(self.mpp))
        object.__setattr__(self, "read_size", int(self.read_size))
        object.__setattr__(self, "model_size", int(self.model_size))
        object.__setattr__(self, "min_tissue", float(self.min_tissue))
        if self.stride is not None:
            object.__setattr__(self, "stride", int(self.stride))

    @classmethod
    def gpfm_native(cls, **overrides) -> TilingSpec:
        """GPFM's own field of view: 0.5 um/px, read 256 px, model 224 (its 512 px at 40x)."""
        return cls(**{"mpp": 0.5, "read_size": 256, "model_size": 224, **overrides})

    @property
    def stride_px(self) -> int:
        """The effective stride in target pixels."""
        return self.read_size if self.stride is None else self.stride

    @property
    def field_of_view_um(self) -> float:
        return self.read_size * self.mpp

    def to_dict(self) -> dict:
        return {
            "mpp": self.mpp,
            "read_size": self.read_size,
            "model_size": self.model_size,
            "stride": self.stride,
            "min_tissue": self.min_tissue,
            "tissue": self.tissue.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TilingSpec:
        if not isinstance(d, dict):
            raise ParameterError(f"a tiling spec must be a mapping, got {type(d).__name__}")
        d = dict(d)
        unknown = set(d) - {"mpp", "read_size", "model_size", "stride", "min_tissue", "tissue"}
        if unknown:
            raise ParameterError(f"unknown tiling parameter(s): {', '.join(sorted(unknown))}")
        if isinstance(d.get("tissue"), dict):
            d["tissue"] = TissueParams.from_dict(d["tissue"])
        return cls(**d)

    def canonical_json(self) -> str:
        """The spec as compact sorted JSON with the stride resolved (what ``id`` hashes)."""
        d = self.to_dict()
        d["stride"] = self.stride_px
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def id(self) -> str:
        """A short stable identifier: equal tilings (stride None == read_size) share it."""
        return hashlib.sha256(("tiling-v1" + self.canonical_json()).encode()).hexdigest()[:12]


@dataclass
class TileGrid:
    """Kept tiles of a slide: level-0 top-left ``coords (N, 2) int64 (x, y)`` in row-major order.

    ``tile_size_l0`` and ``stride_l0`` are level-0 pixels (floats: the target resolution is
    rarely an integer multiple of the scan's); ``tissue_fraction (N,)`` is each tile's share
    of tissue; ``candidates`` is how many tiles the slide held before the tissue filter.
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    tile_size_l0: float
    stride_l0: float
    spec: TilingSpec
    slide_dims: tuple[int, int]
    slide_mpp: float
    candidates: int
    slide_path: str | None = None
    slide_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.tissue_fraction = np.asarray(self.tissue_fraction, dtype=np.float64).reshape(-1)
        if len(self.coords) != len(self.tissue_fraction):
            raise ValueError("coords and tissue_fraction differ in length")

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def spec_id(self) -> str:
        return self.spec.id

    def boxes(self) -> np.ndarray:
        """``(N, 4)`` float level-0 boxes ``x0, y0, x1, y1``."""
        xy = self.coords.astype(np.float64)
        return np.concatenate([xy, xy + self.tile_size_l0], axis=1)

    def header(self) -> dict:
        """What the CSV header records: enough to rebuild the grid and to check its slide."""
        return {
            "spec_id": self.spec.id,
            "spec": self.spec.to_dict(),
            "slide": self.slide_path,
            "slide_fingerprint": self.slide_fingerprint,
            "slide_dims": list(self.slide_dims),
            "slide_mpp": self.slide_mpp,
            "tile_size_l0": self.tile_size_l0,
            "stride_l0": self.stride_l0,
            "candidates": self.candidates,
        }

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write ``index,x,y,tissue_fraction`` rows under ``# key: json`` header comments."""
        from napari_gpfm.analysis._io import atomic_output

        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, "the tile grid") as tmp, \
                open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(_CSV_MAGIC + "\n")
            for key, value in self.header().items():
                fh.write(f"# {key}: {json.dumps(value, sort_keys=True)}\n")
            fh.write("index,x,y,tissue_fraction\n")
            idx = np.arange(len(self))
            rows = np.column_stack([idx, self.coords]).astype(np.int64)
            for (i, x, y), f in zip(rows.tolist(), self.tissue_fraction.tolist(), strict=True):
                fh.write(f"{i},{x},{y},{f:.4f}\n")
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> TileGrid:
        """Read a grid written by :meth:`to_csv` (spec included)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"tile grid file not found: {path}")
        header: dict = {}
        body: list[str] = []
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\n")
            if first != _CSV_MAGIC:
                raise ConfigError(f"{path} is not a napari-gpfm tile grid (write one with "
                                  "`gpfm tiles SLIDE --out coords.csv`)")
            for line in fh:
                if line.startswith("# "):
                    key, _, value = line[2:].partition(": ")
                    try:
                        header[key] = json.loads(value)
                    except json.JSONDecodeError:
                        raise ConfigError(f"{path}: header line '# {key}' is not valid JSON; "
                                          "the file was edited or truncated") from None
                elif line.strip():
                    body.append(line)
        required = ("spec", "slide_dims", "slide_mpp", "tile_size_l0", "stride_l0", "candidates")
        missing = [k for k in required if k not in header]
        if missing or not body or body[0].strip() != "index,x,y,tissue_fraction":
            raise ConfigError(f"{path}: tile grid header or column line is missing "
                              f"({', '.join(missing) or 'columns'}); write it again with gpfm tiles")
        try:
            table = np.array([[float(v) for v in ln.split(",")] for ln in body[1:]],
                             dtype=np.float64).reshape(-1, 4)
        except ValueError:
            raise ConfigError(f"{path}: a tile row is not four numbers; the file was edited or "
                              "truncated") from None
        spec = TilingSpec.from_dict(header["spec"])
        if header.get("spec_id") not in (None, spec.id):
            raise ConfigError(f"{path}: spec_id {header['spec_id']} does not match its spec "
                              f"({spec.id}); the file was edited")
        return cls(
            coords=table[:, 1:3].astype(np.int64),
            tissue_fraction=table[:, 3],
            tile_size_l0=float(header["tile_size_l0"]),
            stride_l0=float(header["stride_l0"]),
            spec=spec,
            slide_dims=tuple(int(v) for v in header["slide_dims"]),  # type: ignore[arg-type]
            slide_mpp=float(header["slide_mpp"]),
            candidates=int(header["candidates"]),
            slide_path=header.get("slide"),
            slide_fingerprint=header.get("slide_fingerprint"),
        )

    def __repr__(self) -> str:
        return (f"TileGrid({len(self)} of {self.candidates} tiles, {self.spec.read_size} px @ "
                f"{self.spec.mpp} um/px = {self.tile_size_l0:.1f} level-0 px, spec {self.spec.id})")


def upsamples(slide_mpp: float, target_mpp: float) -> bool:
    """Whether reading at ``target_mpp`` is finer than the scan by more than the margin."""
    return target_mpp * MAX_UPSAMPLING < slide_mpp


def check_target_mpp(slide_mpp: float, target_mpp: float) -> None:
    """Refuse a target resolution finer than the scan by more than 10% (it would upsample)."""
    if upsamples(slide_mpp, target_mpp):
        raise ParameterError(
            f"--mpp {target_mpp:g} is finer than the slide's own pixel size {slide_mpp:.4g} um/px: "
            f"tiles would be upsampled, inventing detail; use --mpp {slide_mpp:.3g} or coarser"
        )


def grid_positions(length: int, tile: float, stride: float) -> np.ndarray:
    """Level-0 starts ``round(k * stride)`` of the tiles that fit entirely in ``length`` px."""
    if tile > length:
        return np.zeros(0, dtype=np.int64)
    n = int(math.floor((length - tile) / stride + 1e-9)) + 1
    return np.round(np.arange(n) * stride).astype(np.int64)


def make_grid(slide, spec: TilingSpec | None = None, tissue_mask: TissueMask | None = None) -> TileGrid:
    """Lay ``spec`` over ``slide`` and keep the tiles with enough tissue.

    Tiles lie wholly inside level 0 (none is padded with invented glass), start at
    ``round(k * stride_l0)`` and are listed row by row. The tissue mask is detected with
    ``spec.tissue`` unless one is given. Raises the slide's SlideError when it has no pixel size.
    """
    spec = spec or TilingSpec()
    slide_mpp = slide.mpp
    check_target_mpp(slide_mpp, spec.mpp)
    scale = spec.mpp / slide_mpp  # level-0 px per target px
    tile_l0 = spec.read_size * scale
    stride_l0 = spec.stride_px * scale
    width, height = slide.dimensions
    xs = grid_positions(width, tile_l0, stride_l0)
    ys = grid_positions(height, tile_l0, stride_l0)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    if tissue_mask is None:
        tissue_mask = detect_tissue(slide, spec.tissue)
    fraction = tissue_mask.fractions(coords[:, 0], coords[:, 1], tile_l0, tile_l0)
    keep = fraction >= spec.min_tissue - 1e-12
    return TileGrid(
        coords=coords[keep],
        tissue_fraction=fraction[keep],
        tile_size_l0=float(tile_l0),
        stride_l0=float(stride_l0),
        spec=spec,
        slide_dims=(int(width), int(height)),
        slide_mpp=float(slide_mpp),
        candidates=int(len(coords)),
        slide_path=str(Path(slide.path).resolve()),
        slide_fingerprint=slide.fingerprint,
    )
