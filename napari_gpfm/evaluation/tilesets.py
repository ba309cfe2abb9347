"""Labelled tile sets for encoder evaluation: images, labels and the groups splits respect.

Three sources give the same :class:`TileSet`:

* an **ImageFolder** tree ``root/<class>/*.png|jpg|jpeg|tif|tiff``: every image is one tile,
  centre-cropped to a square and resized to ``size``. Images in a sub-folder
  ``root/<class>/<group>/`` share the group ``<group>`` (a patient, a slide, a region); an image
  directly in ``root/<class>/`` is a group of its own. Positions are unknown.
* a **CSV** with the columns ``slide,x,y,w,h,label`` (optional ``group``): each row is one
  labelled level-0 box. The tile is ``size`` pixels at ``mpp`` um/px *centred on the box*, so
  every source and every encoder sees the same field of view (``size * mpp`` um) whatever box
  size the CSV was written with. Slide paths are relative to the CSV's folder. A row is its
  own group unless ``group`` names one (per slide).
* a **slide + GeoJSON regions** (QuPath-style, level-0 polygons with a classification name):
  the slide is covered by a grid of ``size``-pixel tiles at ``mpp`` (top-left at 0, 0, step
  ``stride`` pixels at ``mpp``, default ``size``: no overlap, the grid ``gpfm embed`` uses) and
  a tile is labelled with the class of the polygon holding its *centre*. A tile whose centre
  lies in polygons of two different classes is ambiguous and left out. The group of a tile is
  its polygon, so a split can hold whole regions out (neighbouring tiles of one region never
  land on both sides of a split).

Each tile also records its level-0 centre (NaN when unknown) and its source slide/folder, from
which :mod:`napari_gpfm.evaluation.splits` can derive horizontal bands instead of regions.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_gpfm.errors import ParameterError

if TYPE_CHECKING:
    from napari_gpfm.slides import Slide

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CSV_COLUMNS = ("slide", "x", "y", "w", "h", "label")


@dataclass(frozen=True, eq=False)
class TileSet:
    """Labelled tiles ready for feature extraction.

    ``images`` ``(N, S, S, 3)`` uint8; ``labels`` ``(N,)`` int64 indices into ``class_names``
    (sorted); ``groups`` ``(N,)`` int64 indices into ``group_names`` (the unit a split keeps
    together); ``centres`` ``(N, 2)`` level-0 ``(x, y)`` tile centres (NaN when unknown);
    ``sources`` ``(N,)`` indices into ``source_names`` (slide files or the image folder);
    ``mpp`` the pixel size tiles were read at (None for image files); ``description`` one line
    saying where the tiles came from.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray
    group_names: tuple[str, ...]
    centres: np.ndarray
    sources: np.ndarray
    source_names: tuple[str, ...]
    mpp: float | None
    description: str

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, S, S, 3), got {self.images.dtype} "
                             f"{self.images.shape}")
        for name in ("labels", "groups", "sources"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},)")
        if self.centres.shape != (n, 2):
            raise ValueError(f"centres must have shape ({n}, 2)")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        """Side of every tile in pixels."""
        return int(self.images.shape[1])

    def class_counts(self) -> dict[str, int]:
        """Tiles per class, in ``class_names`` order."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def groups_per_class(self) -> dict[str, int]:
        """Distinct groups (regions) holding each class."""
        return {
            name: int(len(np.unique(self.groups[self.labels == i])))
            for i, name in enumerate(self.class_names)
        }

    def subset(self, index: np.ndarray | Sequence[int]) -> TileSet:
        """The tiles at ``index`` (classes, groups and sources keep their numbering)."""
        idx = np.asarray(index, dtype=np.int64)
        return TileSet(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=self.class_names,
            groups=self.groups[idx],
            group_names=self.group_names,
            centres=self.centres[idx],
            sources=self.sources[idx],
            source_names=self.source_names,
            mpp=self.mpp,
            description=self.description,
        )


# ----------------------------------------------------------------------------- assembling


def _assemble(
    images: list[np.ndarray],
    labels: list[str],
    groups: list[str],
    centres: list[tuple[float, float]],
    sources: list[str],
    mpp: float | None,
    description: str,
    where: str,
) -> TileSet:
    """Index labels/groups/sources, stack the images and check there is something to learn."""
    if not images:
        raise ParameterError(f"{where} gives no labelled tile; check the labels and the regions")
    class_names = tuple(sorted(set(labels)))
    if len(class_names) < 2:
        raise ParameterError(
            f"{where} has tiles of one class only ({class_names[0]!r}); an evaluation needs "
            "labelled tiles of at least two classes"
        )
    class_index = {name: i for i, name in enumerate(class_names)}
    group_names = tuple(dict.fromkeys(groups))
    group_index = {name: i for i, name in enumerate(group_names)}
    source_names = tuple(dict.fromkeys(sources))
    source_index = {name: i for i, name in enumerate(source_names)}
    return TileSet(
        images=np.stack(images).astype(np.uint8, copy=False),
        labels=np.array([class_index[v] for v in labels], dtype=np.int64),
        class_names=class_names,
        groups=np.array([group_index[v] for v in groups], dtype=np.int64),
        group_names=group_names,
        centres=np.asarray(centres, dtype=np.float64).reshape(-1, 2),
        sources=np.array([source_index[v] for v in sources], dtype=np.int64),
        source_names=source_names,
        mpp=mpp,
        description=description,
    )


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 8 <= size <= 4096:
        raise ParameterError(f"--size {size!r}: the tile side must be a whole number of pixels "
                             "between 8 and 4096")
    return int(size)


def _check_mpp(mpp: float) -> float:
    if isinstance(mpp, bool) or not isinstance(mpp, int | float) or not 0.01 <= mpp <= 100:
        raise ParameterError(f"--mpp {mpp!r}: the tile pixel size must be 0.01-100 um/px")
    return float(mpp)


def _open_slide_at(path: Path, mpp: float, slide_mpp: float | None) -> Slide:
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling.grid import upsamples

    slide = open_slide(path, default_mpp=slide_mpp)
    if upsamples(slide.mpp, mpp):
        slide.close()
        raise ParameterError(
            f"--mpp {mpp} is finer than {path.name}'s scan ({slide.mpp:.3f} um/px); reading it "
            f"would upsample: use --mpp {slide.mpp:.3f} or coarser"
        )
    return slide


# ----------------------------------------------------------------------------- image folders


def _square_tile(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from napari_gpfm.slides import resize_rgb

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ParameterError(f"cannot read image {path} ({exc}); remove it or convert it to "
                             "PNG") from None
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_rgb(np.ascontiguousarray(rgb[top : top + side, left : left + side]), size)


def tiles_from_imagefolder(root: str | os.PathLike, size: int = 224) -> TileSet:
    """Tiles from ``root/<class>/[<group>/]*.png|jpg|jpeg|tif|tiff`` (see the module notes)."""
    size = _check_size(size)
    base = Path(root)
    if not base.is_dir():
        raise ParameterError(f"--tiles {base}: not a folder")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ParameterError(f"--tiles {base} has no class folders; lay images out as "
                             f"{base}/<class>/<image>.png")
    images, labels, groups, centres, sources = [], [], [], [], []
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(base).parts)
        )
        for path in files:
            relative = path.relative_to(class_dir)
            group = (f"{class_dir.name}/{relative.parts[0]}" if len(relative.parts) > 1
                     else f"{class_dir.name}/{relative.as_posix()}")
            images.append(_square_tile(path, size))
            labels.append(class_dir.name)
            groups.append(group)
            centres.append((np.nan, np.nan))
            sources.append(str(base))
    if not images:
        raise ParameterError(f"--tiles {base}: no {'/'.join(IMAGE_SUFFIXES)} images in its class "
                             "folders")
    return _assemble(images, labels, groups, centres, sources, None,
                     f"image folder {base} at {size} px", f"--tiles {base}")


# ----------------------------------------------------------------------------- CSV boxes


def _read_csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError(f"cannot read CSV {path} ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ParameterError(f"{path}: missing column(s) {', '.join(missing)}; the header must be "
                             f"{','.join(CSV_COLUMNS)}[,group]")
    rows = []
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        if any(row.values()):
            rows.append((line, row))
    return rows


def tiles_from_csv(
    path: str | os.PathLike,
    mpp: float = 0.5,
    size: int = 224,
    slide_mpp: float | None = None,
) -> TileSet:
    """Tiles centred on the labelled level-0 boxes of a ``slide,x,y,w,h,label[,group]`` CSV."""
    mpp, size = _check_mpp(mpp), _check_size(size)
    src = Path(path)
    if not src.is_file():
        raise ParameterError(f"--tiles {src}: CSV file not found")
    rows = _read_csv_rows(src)
    images, labels, groups, centres, sources = [], [], [], [], []
    slides: dict[Path, Slide] = {}
    try:
        for line, row in rows:
            where = f"{src} line {line}"
            try:
                x, y, w, h = (float(row[k]) for k in ("x", "y", "w", "h"))
            except ValueError:
                raise ParameterError(f"{where}: x, y, w, h must be numbers") from None
            if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
                raise ParameterError(f"{where}: the box needs finite x, y and positive w, h")
            if not row["label"]:
                raise ParameterError(f"{where}: empty label; give every box a class name")
            if not row["slide"]:
                raise ParameterError(f"{where}: empty slide path")
            slide_path = Path(row["slide"]).expanduser()
            if not slide_path.is_absolute():
                slide_path = src.parent / slide_path
            if slide_path not in slides:
                slides[slide_path] = _open_slide_at(slide_path, mpp, slide_mpp)
            slide = slides[slide_path]
            side_l0 = size * mpp / slide.mpp
            cx, cy = x + w / 2.0, y + h / 2.0
            top_left = (int(round(cx - side_l0 / 2.0)), int(round(cy - side_l0 / 2.0)))
            images.append(slide.read_region_mpp(top_left, size, mpp))
            labels.append(row["label"])
            group = row.get("group", "")
            groups.append(f"{slide_path.name}:{group}" if group else f"{src.name}:line {line}")
            centres.append((cx, cy))
            sources.append(str(slide_path))
    finally:
        for slide in slides.values():
            slide.close()
    return _assemble(images, labels, groups, centres, sources, mpp,
                     f"boxes of {src.name} at {mpp:g} um/px, {size} px", f"--tiles {src}")


# ----------------------------------------------------------------------------- slide + regions


def grid_tiles(
    dimensions: tuple[int, int], tile_l0: float, stride_l0: float
) -> np.ndarray:
    """Top-left level-0 corners ``(N, 2)`` of a row-major grid of whole tiles inside the image."""
    width, height = dimensions
    xs = np.arange(0.0, width - tile_l0 + 1e-6, stride_l0)
    ys = np.arange(0.0, height - tile_l0 + 1e-6, stride_l0)
    gx, gy = np.meshgrid(xs, ys)
    return np.column_stack([gx.ravel(), gy.ravel()])


def label_grid(
    corners: np.ndarray, tile_l0: float, annotations: Sequence
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Label grid tiles by the polygon holding their centre.

    Returns ``(tile_index, class_name per tile, region index per tile, n_ambiguous)`` for the
    tiles inside exactly one class's polygons (the first such polygon is the tile's region).
    """
    from napari_gpfm.analysis.geometry import points_in_polygon

    centres = corners + tile_l0 / 2.0
    n = len(centres)
    owner_class = np.full(n, None, dtype=object)
    owner_region = np.full(n, -1, dtype=np.int64)
    ambiguous = np.zeros(n, dtype=bool)
    for region, ann in enumerate(annotations):
        inside = points_in_polygon(centres, ann.polygon)
        fresh = inside & (owner_region < 0)
        owner_class[fresh] = ann.class_name
        owner_region[fresh] = region
        clash = inside & ~fresh & (owner_class != ann.class_name)
        ambiguous |= clash
    keep = np.flatnonzero((owner_region >= 0) & ~ambiguous)
    return keep, owner_class[keep], owner_region[keep], int(ambiguous.sum())


def tiles_from_regions(
    slide_path: str | os.PathLike,
    regions_path: str | os.PathLike,
    mpp: float = 0.5,
    size: int = 224,
    stride: int | None = None,
    slide_mpp: float | None = None,
) -> TileSet:
    """Grid tiles of a slide whose centre lies in a classified GeoJSON polygon (module notes)."""
    from napari_gpfm.analysis.geojson import read_geojson

    mpp, size = _check_mpp(mpp), _check_size(size)
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int)
                               or not 1 <= stride <= 4096):
        raise ParameterError(f"--stride {stride!r}: the grid step must be a whole number of "
                             "pixels between 1 and 4096 (at --mpp)")
    regions = Path(regions_path)
    annotations = [a for a in read_geojson(regions) if a.class_name and a.class_name.strip()]
    if not annotations:
        raise ParameterError(f"{regions} has no region with a classification name; classify the "
                             "regions (QuPath: Set class) before evaluating")
    slide_file = Path(slide_path)
    with _open_slide_at(slide_file, mpp, slide_mpp) as slide:
        tile_l0 = size * mpp / slide.mpp
        stride_l0 = (stride or size) * mpp / slide.mpp
        corners = grid_tiles(slide.dimensions, tile_l0, stride_l0)
        keep, classes, region_of, _ = label_grid(corners, tile_l0, annotations)
        if len(keep) == 0:
            raise ParameterError(
                f"the regions of {regions.name} hold no tile centre of {slide_file.name} at "
                f"{mpp:g} um/px, {size} px; draw larger regions or use a smaller --size"
            )
        region_names = _region_names(annotations)
        images, labels, groups, centres, sources = [], [], [], [], []
        for tile, class_name, region in zip(keep, classes, region_of, strict=True):
            x, y = corners[tile]
            images.append(slide.read_region_mpp((int(round(x)), int(round(y))), size, mpp))
            labels.append(str(class_name).strip())
            groups.append(region_names[region])
            centres.append((x + tile_l0 / 2.0, y + tile_l0 / 2.0))
            sources.append(str(slide_file))
    step = f", stride {stride} px" if stride else ""
    return _assemble(
        images, labels, groups, centres, sources, mpp,
        f"{slide_file.name} + {regions.name} at {mpp:g} um/px, {size} px{step}",
        f"{regions} on {slide_file.name}",
    )


def _region_names(annotations: Sequence) -> list[str]:
    """A unique name per region: its GeoJSON name, else ``<class>#<k>`` (k-th of its class)."""
    counts: dict[str, int] = {}
    names: list[str] = []
    for i, ann in enumerate(annotations):
        cls = ann.class_name.strip()
        counts[cls] = counts.get(cls, 0) + 1
        name = (ann.name or "").strip() or f"{cls}#{counts[cls]}"
        names.append(name if name not in names else f"{name} (region {i + 1})")
    return names


# ----------------------------------------------------------------------------- dispatch


def load_tileset(
    tiles: str | os.PathLike,
    regions: str | os.PathLike | None = None,
    mpp: float = 0.5,
    size: int = 224,
    stride: int | None = None,
    slide_mpp: float | None = None,
) -> TileSet:
    """Read a tile set from an image folder, a CSV of boxes, or a slide with ``regions``."""
    path = Path(tiles)
    if not path.exists():
        raise ParameterError(f"--tiles {path}: no such file or folder")
    if path.is_dir():
        if regions is not None:
            raise ParameterError("--regions goes with a slide file, not an image folder")
        return tiles_from_imagefolder(path, size)
    if path.suffix.lower() == ".csv":
        if regions is not None:
            raise ParameterError("--regions goes with a slide file; a CSV names its own slides")
        return tiles_from_csv(path, mpp, size, slide_mpp)
    if regions is None:
        raise ParameterError(f"--tiles {path} is a slide: give its labelled regions with "
                             "--regions REGIONS.geojson")
    return tiles_from_regions(path, regions, mpp, size, stride, slide_mpp)
