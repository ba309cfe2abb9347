"""Features of labelled tiles: any registry encoder, or a colour-histogram baseline.

A :class:`FeatureExtractor` has a ``name`` (as the user wrote it in ``--models``), an
``identity`` (encoder + weights, e.g. ``timm:vit_small_patch14_dinov2@0123456789ab``) and
``embed(images) -> (N, D) float32``. Registry encoders run through their own
``preprocess_on_device`` and ``forward(x)["cls"]``, in batches, without gradients.

The baseline ``baseline:colour-histogram`` answers "how far does colour alone go?": a joint
RGB histogram with ``bins`` bins per channel (8 -> 512 features; bin ``i`` of a channel holds
values ``[32 i, 32 i + 32)``) over all pixels of the tile, L1-normalised and then multiplied by
the number of bins: a density relative to a uniform histogram, whose features average 1 like
a network's normalised embedding. The scale matters only to the linear probe, whose fixed
learning rate and epoch budget assume features of order 1 (plain fractions of ~1/512 leave
it badly under-fitted); cosine kNN and z-scored retrieval do not depend on it. The baseline
has no parameters and no weights. An encoder that does not beat it on a task has learnt
nothing beyond stain colour for that task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from napari_gpfm.errors import EncoderNotFoundError, ParameterError, WeightsError

BASELINE_PREFIX = "baseline:"
COLOUR_HISTOGRAM = "baseline:colour-histogram"
BASELINES = ("colour-histogram",)
#: How the colour histogram may be spelt after ``baseline:``.
COLOUR_HISTOGRAM_KINDS = ("colour-histogram", "color-histogram")


class FeatureExtractor(Protocol):
    """Anything that turns uint8 tiles ``(N, S, S, 3)`` into features ``(N, D)``."""

    name: str

    @property
    def identity(self) -> str: ...

    def embed(self, images: np.ndarray) -> np.ndarray: ...


def _check_images(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 tiles (N, S, S, 3), got {arr.dtype} {arr.shape}")
    return arr


@dataclass(frozen=True)
class ColourHistogram:
    """Joint RGB histogram baseline (module notes); ``bins`` must divide 256."""

    bins: int = 8
    name: str = COLOUR_HISTOGRAM

    def __post_init__(self) -> None:
        if self.bins < 1 or 256 % self.bins:
            raise ParameterError(f"colour histogram bins={self.bins} must divide 256")

    @property
    def identity(self) -> str:
        """The baseline and its bin count, e.g. ``baseline:colour-histogram@rgb8``."""
        return f"{self.name}@rgb{self.bins}"

    @property
    def dim(self) -> int:
        return self.bins**3

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, bins**3)`` float32 histograms, each summing to ``bins**3`` (mean 1 per bin)."""
        arr = _check_images(images)
        n = len(arr)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        shift = 256 // self.bins
        q = (arr // shift).astype(np.int64)
        code = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
        code = code.reshape(n, -1) + (np.arange(n, dtype=np.int64) * self.dim)[:, None]
        counts = np.bincount(code.ravel(), minlength=n * self.dim).reshape(n, self.dim)
        density = counts * (self.dim / counts.sum(axis=1, keepdims=True))
        return density.astype(np.float32)


class EncoderFeatures:
    """Registry encoder as a feature extractor: CLS embeddings of batches of tiles."""

    def __init__(self, encoder: Any, name: str | None = None, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ParameterError(f"--batch-size {batch_size}: must be at least 1")
        self.encoder = encoder
        self.name = name or encoder.spec.name
        self.batch_size = int(batch_size)

    @property
    def identity(self) -> str:
        """The encoder's ``name@weights-sha256[:12]``."""
        return str(self.encoder.encoder_id)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, embed_dim)`` float32 CLS features of uint8 tiles ``(N, S, S, 3)``."""
        import torch

        arr = _check_images(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(arr), self.batch_size):
                x = self.encoder.preprocess_on_device(arr[start : start + self.batch_size])
                out.append(self.encoder(x)["cls"].float().cpu().numpy())
        if not out:
            return np.zeros((0, self.encoder.embed_dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def parse_model(text: str) -> tuple[str, Path | None]:
    """``NAME`` or ``NAME=WEIGHTS`` -> ``(name, weights path or None)``.

    Names never hold ``=``, so the first ``=`` separates the weights path.
    """
    name, sep, weights = str(text).partition("=")
    name = name.strip()
    if not name:
        raise ParameterError(f"--models {text!r}: give NAME or NAME=WEIGHTS")
    if sep and not weights.strip():
        raise ParameterError(f"--models {text!r}: the weights path after '=' is empty")
    return name, (Path(weights.strip()).expanduser() if sep else None)


def check_model(text: str) -> None:
    """Fail early, before reading tiles, on an unknown name or a missing weights file."""
    name, weights = parse_model(text)
    if name.lower().startswith(BASELINE_PREFIX):
        _baseline(name)
        if weights is not None:
            raise ParameterError(f"--models {text!r}: a baseline has no weights")
        return
    from napari_gpfm.encoders import get_spec

    if weights is not None and not weights.is_file():
        raise WeightsError(f"weights file {weights} (for --models {name}) not found")
    if weights is not None and name.strip().lower() == "default":
        return  # its description is read beside the weights when loading
    get_spec(name)


def is_colour_histogram(name: str) -> bool:
    """Whether ``name`` is ``baseline:colour-histogram`` (either spelling, any case)."""
    text = str(name).strip().lower()
    return (text.startswith(BASELINE_PREFIX)
            and text[len(BASELINE_PREFIX) :].strip() in COLOUR_HISTOGRAM_KINDS)


def _baseline(name: str) -> ColourHistogram:
    if is_colour_histogram(name):
        return ColourHistogram()
    raise EncoderNotFoundError(
        f"no baseline named {name!r}; baselines: "
        + ", ".join(f"{BASELINE_PREFIX}{b}" for b in BASELINES)
    )


def load_extractor(
    text: str,
    device: str = "cpu",
    batch_size: int = 32,
    models_dir: str | os.PathLike[str] | None = None,
) -> FeatureExtractor:
    """The extractor for ``NAME[=WEIGHTS]`` or ``baseline:colour-histogram``.

    Raises the registry's :class:`EncoderNotFoundError` / :class:`WeightsError` for unknown
    names and missing or unfit weights.
    """
    name, weights = parse_model(text)
    if name.lower().startswith(BASELINE_PREFIX):
        check_model(text)
        return _baseline(name)
    from napari_gpfm.encoders import load_encoder

    encoder = load_encoder(name, weights=weights, device=device, models_dir=models_dir)
    return EncoderFeatures(encoder, name=name, batch_size=batch_size)
