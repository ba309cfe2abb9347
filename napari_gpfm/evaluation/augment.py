"""Seeded tile augmentations for the "find the original tile" retrieval protocol.

Each query is a copy of a tile changed the way the same tissue changes between scans and
stainings, never enough to change what it shows:

1. a random dihedral transform (one of 4 rotations by 90 degrees, optionally mirrored);
2. a small rotation (uniform in +-``max_rotation_deg``) followed by a crop: the largest
   axis-aligned square inside the rotated tile (so no empty corners enter) is cropped to a
   random sub-square of ``min_crop``-1 of its side, and resized back to the tile size;
3. colour jitter: brightness, contrast and saturation factors uniform in ``1 +- value``, and
   a hue shift uniform in ``+-hue`` of a full turn;
4. JPEG recompression at a quality uniform in ``jpeg_quality``.

Tile ``i`` draws its parameters from ``numpy.random.default_rng([seed, i])``: the same seed
gives the same queries for every encoder, whatever else runs.

Each component can be switched off (``dihedral=False``; ``max_rotation_deg=0`` with
``min_crop=1``; zero colour strengths; ``jpeg_quality=None``) to ask which change an encoder
fails on. Every parameter is drawn whether or not its component applies, so a component
kept on gets the very draws it has in the full augmentation.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np

from napari_gpfm.errors import ParameterError


@dataclass(frozen=True)
class AugmentParams:
    """Strength of each augmentation (module notes)."""

    dihedral: bool = True
    max_rotation_deg: float = 10.0
    min_crop: float = 0.8
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.03
    jpeg_quality: tuple[int, int] | None = (60, 90)  # None: no recompression

    def __post_init__(self) -> None:
        if not 0 < self.min_crop <= 1:
            raise ParameterError(f"min_crop={self.min_crop} must be in (0, 1]")
        if self.max_rotation_deg < 0:
            raise ParameterError(f"max_rotation_deg={self.max_rotation_deg} must be 0 or more")
        if self.jpeg_quality is not None:
            lo, hi = self.jpeg_quality
            if not 1 <= lo <= hi <= 100:
                raise ParameterError(
                    f"jpeg_quality={self.jpeg_quality} must be 1 <= low <= high <= 100, or None")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ParameterError(f"{name}={getattr(self, name)} must be in [0, 1)")

    def to_dict(self) -> dict:
        """Plain-data description for reports."""
        return asdict(self)


def _geometric(img, rng: np.random.Generator, params: AugmentParams, size: int):
    from PIL import Image

    turns = int(rng.integers(0, 4))
    mirror = rng.random() < 0.5
    if params.dihedral:
        if turns:
            img = img.rotate(90 * turns, expand=True)
        if mirror:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-params.max_rotation_deg, params.max_rotation_deg))
    theta = math.radians(abs(angle))
    inner = size / (math.cos(theta) + math.sin(theta))
    side = inner * float(rng.uniform(params.min_crop, 1.0))
    margin = (size - inner) / 2.0
    left = margin + float(rng.uniform(0.0, inner - side))
    top = margin + float(rng.uniform(0.0, inner - side))
    if angle == 0 and side == size:
        return img  # both off: resampling the whole tile onto itself would only blur it
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    return img.resize((size, size), Image.Resampling.BICUBIC,
                      box=(left, top, left + side, top + side))


def _colour(img, rng: np.random.Generator, params: AugmentParams):
    from PIL import Image

    factors = [float(rng.uniform(1 - v, 1 + v))
               for v in (params.brightness, params.contrast, params.saturation)]
    shift = float(rng.uniform(-params.hue, params.hue))
    if factors == [1.0, 1.0, 1.0] and not shift:
        return img
    x = np.asarray(img, dtype=np.float32)
    x = x * factors[0]
    gray_mean = float((x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
    x = (x - gray_mean) * factors[1] + gray_mean
    gray = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    x = (x - gray) * factors[2] + gray
    out = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    if shift:
        hsv = np.asarray(out.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + int(round(shift * 256))) % 256).astype(
            np.uint8
        )
        out = Image.frombytes("HSV", out.size, hsv.tobytes()).convert("RGB")
    return out


def _jpeg(img, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    from PIL import Image

    if params.jpeg_quality is None:
        return np.asarray(img.convert("RGB"))
    lo, hi = params.jpeg_quality
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(lo, hi + 1)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def augment_tile(tile: np.ndarray, rng: np.random.Generator,
                 params: AugmentParams | None = None) -> np.ndarray:
    """One augmented copy of a square uint8 tile ``(S, S, 3)``, same shape."""
    from PIL import Image

    params = params or AugmentParams()
    if tile.ndim != 3 or tile.shape[0] != tile.shape[1] or tile.shape[2] != 3:
        raise ValueError(f"expected a square RGB tile (S, S, 3), got {tile.shape}")
    size = tile.shape[0]
    img = _geometric(Image.fromarray(np.ascontiguousarray(tile, dtype=np.uint8)), rng, params,
                     size)
    img = _colour(img, rng, params)
    return _jpeg(img, rng, params)


def augment_tiles(images: np.ndarray, seed: int = 0,
                  params: AugmentParams | None = None) -> np.ndarray:
    """Augmented copies ``(N, S, S, 3)`` of uint8 tiles; tile ``i`` uses rng ``[seed, i]``."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 tiles (N, S, S, 3), got {arr.dtype} {arr.shape}")
    params = params or AugmentParams()
    out = np.empty_like(arr)
    for i in range(len(arr)):
        out[i] = augment_tile(arr[i], np.random.default_rng([int(seed), i]), params)
    return out
