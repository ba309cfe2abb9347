"""Synthetic pyramidal whole-slide images of any size, textured with real H&E tiles.

Benchmarks and tests need slides far larger than the bundled sample, written in seconds and
read back with realistic costs. :func:`write_synthetic_slide` cuts a small bank of tiles out
of a real slide (the bundled CMU-1-Small-Region by default), then writes a BigTIFF whose
JPEG tiles are bank tiles in random orientations: decoding them costs what decoding a scanned
slide costs, and tissue detection has real tissue and real glass to tell apart.

Layout. Tissue fills an irregular blob centred in the slide; outside it, tiles are glass
(background tiles of the source, or a plain near-white if the source has none). The choice of
bank tile, its orientation (rot90 x flip) and tissue/glass are fixed per level-0 tile by
``seed``, so the same arguments always give the same pixels.

Pyramid. Level ``l`` is written from the same bank, each bank tile box-downsampled by
``2**l`` and placed where its level-0 tile lies. Before JPEG this is the exact box downsample
of level 0 (for tile sizes divisible by ``2**l``); after JPEG the levels differ by the usual
compression noise. Nothing is ever read back, so memory stays flat whatever the slide size.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_gpfm.errors import ParameterError

# A level is added (2x smaller) while the smaller side of the last one is at least this.
MIN_LEVEL_SIDE = 1024
# Bank sizes: enough variety that repeats are not obvious, small enough to stay a few MiB.
MAX_TISSUE_TILES = 48
MAX_GLASS_TILES = 8
# Tile classification on the source: a pixel is tissue when it is coloured and not bright.
_TISSUE_SATURATION = 20
_TISSUE_MAX_MEAN = 225
_TISSUE_TILE_FRACTION = 0.6
_GLASS_TILE_FRACTION = 0.02
# Glass colour when the source has no background tiles (typical brightfield background).
_GLASS_RGB = (242, 240, 243)
# Raw tile bytes handed to the JPEG encoder threads at a time: bounds the writer's memory.
_ENCODE_BUFFER = 16 << 20


@dataclass(frozen=True)
class _Bank:
    tissue: np.ndarray  # (N, tile, tile, 3) uint8
    glass: np.ndarray  # (M, tile, tile, 3) uint8


@dataclass(frozen=True)
class _Layout:
    """Per level-0 tile (padded grid): tissue or glass, which bank tile, which orientation."""

    is_tissue: np.ndarray  # (rows, cols) bool
    choice: np.ndarray  # (rows, cols) int: index into the tissue or the glass bank
    orient: np.ndarray  # (rows, cols) int in 0..7: rot90 count (0..3) + 4 * flip


def default_level_count(width: int, height: int) -> int:
    """1 + the number of 2x reductions until the smaller side is below MIN_LEVEL_SIDE."""
    n = 1
    while min(width, height) // 2 ** (n - 1) >= MIN_LEVEL_SIDE:
        n += 1
    return n


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    mpp: float = 0.25,
    tile: int = 256,
    levels: int | None = None,
    quality: int = 85,
    ome: bool = False,
    seed: int = 0,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write a tiled, JPEG-compressed, pyramidal BigTIFF of ``width`` x ``height`` pixels.

    Args:
        path: output file (``.tif``; ``.ome.tif`` with ``ome=True``). Written to a
            ``.partial`` file first and renamed at the end, so a half-written slide never
            takes the final name.
        width, height: level-0 size in pixels (tens of thousands per side are fine: memory
            does not grow with the size).
        mpp: level-0 microns per pixel, stored in the resolution tags (and in the OME-XML
            with ``ome=True``) so readers report it. The texture keeps the source's own scale.
        tile: tile side in pixels (a multiple of 16).
        levels: number of pyramid levels, 2x apart; default: down to a smaller side below
            1024 px. Levels after the first are SubIFDs of the first page.
        quality: JPEG quality (1-100).
        ome: write an OME-TIFF (OME-XML metadata, same pyramid layout).
        seed: fixes the layout and the choice and orientation of every tile.
        source: the slide whose tiles texture the result; default: the bundled H&E sample.

    Returns:
        The path of the written slide.
    """
    import tifffile

    width, height, tile, quality = int(width), int(height), int(tile), int(quality)
    if width < 1 or height < 1:
        raise ParameterError(f"width={width}, height={height}: a slide needs at least 1 x 1 px")
    if tile < 16 or tile % 16:
        raise ParameterError(f"tile={tile} must be a multiple of 16 (TIFF tiles), e.g. 256")
    if not (
        isinstance(mpp, numbers.Real)
        and not isinstance(mpp, bool)
        and math.isfinite(mpp)
        and 0.01 <= mpp <= 100
    ):
        raise ParameterError(f"mpp={mpp!r} must be a pixel size in um/px between 0.01 and 100")
    if not 1 <= quality <= 100:
        raise ParameterError(f"quality={quality} must be a JPEG quality between 1 and 100")
    n_levels = default_level_count(width, height) if levels is None else int(levels)
    if n_levels < 1 or min(width, height) >> (n_levels - 1) < 1:
        raise ParameterError(
            f"levels={levels} does not fit a {width} x {height} px slide (each level halves it)"
        )

    bank = _build_bank(source, tile, seed)
    layout = _make_layout(width, height, tile, n_levels, bank, seed)

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    description = (
        f"napari-gpfm synthetic slide (not a scan): {width} x {height} px at {mpp} um/px, "
        f"JPEG tiles sampled from {_source_name(source)} with seed {seed}"
    )
    options = {
        "photometric": "rgb",  # tifffile stores JPEG as subsampled YCbCr, like scanners do
        "tile": (tile, tile),
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "resolutionunit": "CENTIMETER",
        "maxworkers": min(4, os.cpu_count() or 1),
        # tifffile buffers this many raw bytes of tiles per parallel batch (default 512 MiB)
        "buffersize": _ENCODE_BUFFER,
    }
    if ome:
        first_page = {
            "metadata": {
                "axes": "YXS",
                "Name": description,
                "PhysicalSizeX": mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm",
            }
        }
    else:
        first_page = {"description": description, "metadata": None}
    try:
        with tifffile.TiffWriter(partial, bigtiff=True, ome=ome) as tif:
            for level in range(n_levels):
                f = 2**level
                w, h = max(1, width // f), max(1, height // f)
                extra = first_page if level == 0 else {"subfiletype": 1}
                if level == 0 and n_levels > 1:
                    extra = dict(extra, subifds=n_levels - 1)
                tif.write(
                    _level_tiles(bank, layout, level, w, h, tile),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)),
                    **options,
                    **extra,
                )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _source_name(source: str | os.PathLike | None) -> str:
    if source is None:
        from napari_gpfm.data.sample import SAMPLE_SLIDE_NAME

        return SAMPLE_SLIDE_NAME
    return Path(source).name


def _build_bank(source: str | os.PathLike | None, tile: int, seed: int) -> _Bank:
    """Tissue and glass tiles cut from level 0 of the source, on a half-tile grid."""
    from napari_gpfm.data.sample import sample_slide_path
    from napari_gpfm.slides.slide import open_slide

    with open_slide(source if source is not None else sample_slide_path(), mpp=1.0) as slide:
        w, h = slide.dimensions
        if w < tile or h < tile:
            raise ParameterError(
                f"tile={tile} is larger than the source slide {slide.path} ({w} x {h} px): "
                "use a smaller tile or a larger source"
            )
        # Half-tile steps give more distinct tiles from a small source; at most ~24 x 24 cuts.
        step = max(tile // 2, math.ceil(max(w, h) / 24))
        xs = list(range(0, w - tile + 1, step))
        ys = list(range(0, h - tile + 1, step))
        whole = slide.read_region((0, 0), 0, (w, h)) if w * h <= 64_000_000 else None
        if whole is not None:  # one pass over the source instead of one per cut
            tissue_sum = np.pad(
                _tissue_pixels(whole).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32),
                ((1, 0), (1, 0)),
            )
        cuts, fractions = [], []
        for y in ys:
            for x in xs:
                if whole is not None:
                    cuts.append(np.ascontiguousarray(whole[y : y + tile, x : x + tile]))
                    s = (
                        tissue_sum[y + tile, x + tile]
                        - tissue_sum[y, x + tile]
                        - tissue_sum[y + tile, x]
                        + tissue_sum[y, x]
                    )
                    fractions.append(s / tile**2)
                else:
                    cuts.append(slide.read_region((x, y), 0, (tile, tile)))
                    fractions.append(float(_tissue_pixels(cuts[-1]).mean()))
    fractions = np.asarray(fractions)
    rng = np.random.default_rng(seed)
    tissue_idx = np.flatnonzero(fractions >= _TISSUE_TILE_FRACTION)
    if tissue_idx.size == 0:  # a sparse source: its most tissue-rich tiles will do
        tissue_idx = np.argsort(fractions)[::-1][: min(8, len(cuts))]
    glass_idx = np.flatnonzero(fractions <= _GLASS_TILE_FRACTION)
    tissue_idx = rng.permutation(tissue_idx)[:MAX_TISSUE_TILES]
    glass_idx = rng.permutation(glass_idx)[:MAX_GLASS_TILES]
    tissue = np.stack([cuts[i] for i in tissue_idx])
    if glass_idx.size:
        glass = np.stack([cuts[i] for i in glass_idx])
    else:
        noise = rng.integers(-2, 3, size=(1, tile, tile, 3))
        glass = np.clip(np.asarray(_GLASS_RGB) + noise, 0, 255).astype(np.uint8)
    return _Bank(tissue=tissue, glass=glass)


def _tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Coloured, not bright pixels (int32 0/1, ready to sum)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # per-channel ops: much faster than axis=2
    saturation = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    brightness = r.astype(np.int32) + g + b
    return ((saturation > _TISSUE_SATURATION) & (brightness < 3 * _TISSUE_MAX_MEAN)).astype(
        np.int32
    )


def _make_layout(
    width: int, height: int, tile: int, n_levels: int, bank: _Bank, seed: int
) -> _Layout:
    # Pad the level-0 tile grid so every tile of every level covers whole grid cells.
    f_max = 2 ** (n_levels - 1)
    rows = math.ceil(math.ceil(height / tile) / f_max) * f_max
    cols = math.ceil(math.ceil(width / tile) / f_max) * f_max
    rng = np.random.default_rng(seed)
    # An irregular blob: an ellipse inscribed in the slide whose radius wobbles with angle.
    cy = (np.arange(rows) + 0.5) * tile / height * 2 - 1
    cx = (np.arange(cols) + 0.5) * tile / width * 2 - 1
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    theta = np.arctan2(yy, xx)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    radius = 0.85 * (
        1
        + 0.08 * np.sin(3 * theta + phases[0])
        + 0.05 * np.sin(5 * theta + phases[1])
        + 0.03 * np.sin(9 * theta + phases[2])
    )
    is_tissue = np.hypot(xx, yy) <= radius
    n_tissue, n_glass = len(bank.tissue), len(bank.glass)
    choice = np.where(
        is_tissue,
        rng.integers(0, n_tissue, size=(rows, cols)),
        rng.integers(0, n_glass, size=(rows, cols)),
    )
    orient = rng.integers(0, 8, size=(rows, cols))
    return _Layout(is_tissue=is_tissue, choice=choice, orient=orient)


def _oriented(t: np.ndarray, orient: int) -> np.ndarray:
    t = np.rot90(t, orient % 4)
    return t[:, ::-1] if orient >= 4 else t


def _level_tiles(
    bank: _Bank, layout: _Layout, level: int, width: int, height: int, tile: int
) -> Iterator[np.ndarray]:
    """The tiles of one level, row by row, each ``(tile, tile, 3)`` uint8."""
    from PIL import Image

    f = 2**level
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    if f == 1:
        for r in range(rows):
            for c in range(cols):
                src = bank.tissue if layout.is_tissue[r, c] else bank.glass
                yield np.ascontiguousarray(_oriented(src[layout.choice[r, c]], layout.orient[r, c]))
        return
    # Each output tile holds f x f level-0 tiles, each shrunk to (about) tile / f pixels.
    edges = [round(k * tile / f) for k in range(f + 1)]
    shrunk: dict[tuple[bool, int, int, int], np.ndarray] = {}

    def piece(tissue: bool, idx: int, orient: int, h: int, w: int) -> np.ndarray:
        # Resize before orienting (cheaper, cacheable); an odd rot90 swaps the two sides.
        sh, sw = (w, h) if orient % 2 else (h, w)
        key = (tissue, idx, sh, sw)
        small = shrunk.get(key)
        if small is None:
            src = (bank.tissue if tissue else bank.glass)[idx]
            small = np.asarray(Image.fromarray(src).resize((sw, sh), Image.Resampling.BOX))
            shrunk[key] = small
        return _oriented(small, orient)

    for r in range(rows):
        for c in range(cols):
            out = np.empty((tile, tile, 3), dtype=np.uint8)
            for i in range(f):
                y0, y1 = edges[i], edges[i + 1]
                if y0 == y1:
                    continue
                gr = r * f + i
                for j in range(f):
                    x0, x1 = edges[j], edges[j + 1]
                    if x0 == x1:
                        continue
                    gc = c * f + j
                    out[y0:y1, x0:x1] = piece(
                        bool(layout.is_tissue[gr, gc]),
                        int(layout.choice[gr, gc]),
                        int(layout.orient[gr, gc]),
                        y1 - y0,
                        x1 - x0,
                    )
            yield out
