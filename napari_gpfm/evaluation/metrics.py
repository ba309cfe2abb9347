"""Classification and ranking metrics with percentile-bootstrap confidence intervals.

Definitions (``y`` true class indices, ``proba`` per-class scores):

* ``accuracy``: fraction of tiles whose highest-scoring class is right.
* ``balanced_accuracy``: mean over the classes present in ``y`` of their recall. This is what
  GPFM's code calls macro top-1 accuracy (torchmetrics ``MulticlassAccuracy(average="macro")``).
* ``f1_macro``: mean F1 over the classes present in ``y`` or in the predictions (as
  scikit-learn's ``f1_score(average="macro")``).
* ``auroc_macro``: one-vs-rest AUROC of each class's score, averaged over the classes that
  have both positive and negative tiles (Mann-Whitney form, ties count one half).

Bootstrap: the evaluated tiles are resampled with replacement ``n_boot`` times (a seeded
generator); the interval is the 2.5th-97.5th percentile of the metric over the resamples
(resamples where a metric is undefined, e.g. one class only for AUROC, are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auroc_macro")


@dataclass(frozen=True)
class Estimate:
    """A metric on the full evaluation set with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float]:
        """``{"value", "low", "high"}`` as plain floats."""
        return {"value": self.value, "low": self.low, "high": self.high}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; equal values share the mean of their ranks."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run = np.cumsum(starts_run) - 1
    starts = np.flatnonzero(starts_run)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[run]
    return ranks


def auroc_ovr_macro(y: np.ndarray, scores: np.ndarray, n_classes: int) -> float:
    """Macro one-vs-rest AUROC over the classes with positives and negatives (NaN if none)."""
    y = np.asarray(y)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(y)
    values = []
    for c in range(n_classes):
        positive = y == c
        n_pos = int(positive.sum())
        n_neg = n - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = average_ranks(scores[:, c])
        values.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    return float(np.mean(values)) if values else math.nan


def classification_metrics(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 and macro AUROC (module notes)."""
    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    pred = proba.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(confusion, (y, pred), 1.0)
    true_count = confusion.sum(axis=1)
    pred_count = confusion.sum(axis=0)
    hits = np.diag(confusion)
    in_truth = true_count > 0
    recall = np.divide(hits, true_count, out=np.zeros(n_classes), where=in_truth)
    precision = np.divide(hits, pred_count, out=np.zeros(n_classes), where=pred_count > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n_classes), where=denom > 0)
    seen = in_truth | (pred_count > 0)
    return {
        "accuracy": float(hits.sum() / max(len(y), 1)),
        "balanced_accuracy": float(recall[in_truth].mean()) if in_truth.any() else math.nan,
        "f1_macro": float(f1[seen].mean()) if seen.any() else math.nan,
        "auroc_macro": auroc_ovr_macro(y, proba, n_classes),
    }


def bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n_items: int,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Estimate]:
    """Point estimates of ``statistic(all indices)`` with percentile-bootstrap intervals.

    ``statistic`` maps an index array (into the evaluated items) to named metric values.
    ``n_boot=0`` gives NaN intervals.
    """
    full = statistic(np.arange(n_items))
    samples: dict[str, list[float]] = {name: [] for name in full}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        values = statistic(rng.integers(0, n_items, size=n_items))
        for name in full:
            samples[name].append(values[name])
    tail = (1.0 - confidence) / 2.0 * 100.0
    out = {}
    for name, value in full.items():
        drawn = np.asarray(samples[name], dtype=np.float64)
        drawn = drawn[np.isfinite(drawn)]
        if len(drawn) == 0:
            out[name] = Estimate(float(value), math.nan, math.nan)
        else:
            low, high = np.percentile(drawn, [tail, 100.0 - tail])
            out[name] = Estimate(float(value), float(low), float(high))
    return out


def tie_aware_hits(
    higher: np.ndarray, tied: np.ndarray, ks: tuple[int, ...]
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Expected top-k hit and reciprocal rank of a target under uniform random tie-breaking.

    ``higher[i]`` items score strictly above query ``i``'s target and ``tied[i]`` other items
    score exactly the same, so its rank is uniform on ``higher + 1 .. higher + tied + 1``.
    Returns ``({k: P(rank <= k)}, E[1 / rank])``, one value per query. Counting ties this way
    keeps a metric independent of the order items happen to be stored in.
    """
    higher = np.asarray(higher, dtype=np.float64).reshape(-1)
    tied = np.asarray(tied, dtype=np.float64).reshape(-1)
    hits = {k: np.clip((k - higher) / (tied + 1.0), 0.0, 1.0) for k in ks}
    reciprocal = np.empty(len(higher), dtype=np.float64)
    for i, (h, t) in enumerate(zip(higher, tied, strict=True)):
        ranks = np.arange(h + 1.0, h + t + 2.0)
        reciprocal[i] = float(np.mean(1.0 / ranks))
    return hits, reciprocal
