"""Evaluate several encoders on one labelled tile set with the same split and queries.

Every encoder sees the same tiles, the same grouped split and the same augmented queries (all
fixed by the seed), so the rows of the report differ only by the encoder. Encoders are loaded
one at a time and dropped after embedding, so two large models never share memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from napari_gpfm.errors import ParameterError
from napari_gpfm.evaluation.features import check_model, load_extractor
from napari_gpfm.evaluation.protocols import (
    PROTOCOLS,
    augmentation_retrieval,
    knn_probe,
    linear_probe,
    retrieval,
)
from napari_gpfm.evaluation.report import EvaluationReport
from napari_gpfm.evaluation.splits import describe_folds, make_folds, make_split
from napari_gpfm.evaluation.tilesets import TileSet


@dataclass(frozen=True)
class EvalSettings:
    """Protocol settings shared by every encoder of one evaluation."""

    protocols: tuple[str, ...] = PROTOCOLS
    split: str = "region"
    n_bands: int = 5
    folds: int = 0  # 0: one held-out split; k >= 3: k-fold cross-validation over the groups
    seed: int = 0
    n_boot: int = 1000
    epochs: int = 3000
    patience: int = 100
    knn_k: int = 20
    knn_temperature: float = 0.07
    device: str = "cpu"
    batch_size: int = 32
    augment: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ParameterError(
                f"protocol(s) {', '.join(unknown) or '(none)'}: use {', '.join(PROTOCOLS)} or all"
            )
        if self.n_boot < 0:
            raise ParameterError(f"--bootstrap {self.n_boot}: must be 0 or more resamples")


def evaluate(
    models: Sequence[str],
    tileset: TileSet,
    settings: EvalSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Run ``settings.protocols`` for each ``NAME[=WEIGHTS]`` (or ``baseline:...``) model.

    Names are checked before any work; the split is made once (``settings.split``, seeded)
    and shared by the supervised protocols, the augmented queries are made once and shared too.
    """
    from napari_gpfm.evaluation.augment import AugmentParams, augment_tiles

    settings = settings or EvalSettings()
    say = log or (lambda _msg: None)
    if not models:
        raise ParameterError("no encoder to evaluate: give --models NAME ... or --baseline")
    for model in models:
        check_model(model)
    n_classes = len(tileset.class_names)
    # Augmentation retrieval searches all tiles and needs no split (nor two regions per class).
    supervised = [p for p in settings.protocols if p != "augretrieval"]
    split, split_line = None, "no split (augmentation retrieval only)"
    if supervised:
        if settings.folds:
            split = make_folds(tileset, settings.folds, settings.split, settings.seed,
                               settings.n_bands)
            split_line = describe_folds(split, tileset.labels, tileset.class_names)
        else:
            split = make_split(tileset, settings.split, settings.seed, settings.n_bands)
            split_line = split.describe(tileset.labels, tileset.class_names)
        say(split_line)
    augmented = None
    aug_params = AugmentParams(**settings.augment)
    if "augretrieval" in settings.protocols:
        augmented = augment_tiles(tileset.images, settings.seed, aug_params)

    report = EvaluationReport(
        tiles=f"{tileset.description}: {len(tileset)} tiles",
        class_counts=tileset.class_counts(),
        split=split_line,
        seed=settings.seed,
        n_boot=settings.n_boot,
    )
    for model in models:
        extractor = load_extractor(model, settings.device, settings.batch_size)
        began = time.perf_counter()
        features = extractor.embed(tileset.images)
        say(f"{extractor.name}: {len(features)} tiles -> {features.shape[1]} features "
            f"in {time.perf_counter() - began:.1f} s")
        for protocol in settings.protocols:
            common = {"seed": settings.seed, "n_boot": settings.n_boot}
            if protocol == "linear":
                result = linear_probe(features, tileset.labels, split, n_classes,
                                      epochs=settings.epochs, patience=settings.patience,
                                      **common)
            elif protocol == "knn":
                result = knn_probe(features, tileset.labels, split, n_classes, k=settings.knn_k,
                                   temperature=settings.knn_temperature, **common)
            elif protocol == "retrieval":
                result = retrieval(features, tileset.labels, split, n_classes, **common)
            else:
                queries = extractor.embed(augmented)
                result = augmentation_retrieval(features, queries, tileset.labels,
                                                params=aug_params.to_dict(), **common)
            report.add(extractor.name, extractor.identity, result)
            say(f"  {protocol}: " + ", ".join(f"{k} {v}" for k, v in result.metrics.items()))
        del extractor, features
    return report

