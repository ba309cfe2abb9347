"""GPFM's tile-level evaluation protocols on frozen features (research note section 6.4).

* :func:`linear_probe` -- GPFM ``ROI_tasks/linear.py``: one ``Linear(D -> C)`` layer (weights
  N(0, 0.01), zero bias) trained with cross-entropy, ``AdamW(lr=5e-4, weight_decay=1e-5)``,
  batch 256, a per-iteration ``CosineAnnealingLR(T_max=epochs * iterations, eta_min=1e-5)``, up
  to 3000 epochs; after each epoch the validation macro AUROC is measured and the weights with
  the best value are kept; training stops after 100 epochs without an improvement. The kept
  weights are evaluated on the test tiles. One deviation: an epoch whose validation AUROC
  *equals* the best so far also counts as better when its validation cross-entropy is lower.
  GPFM's strict rule freezes the weights of the first epoch that reaches AUROC 1.0, which on
  an easy task is after a single step from the N(0, 0.01) start, when the ranking within each
  class is right but the argmax across classes is not yet (accuracy far below what the
  features allow).
* :func:`knn_probe` -- GPFM ``ROI_tasks/knn.py`` (DINOv2's): cosine similarity between
  L2-normalised features; the ``k = 20`` most similar database tiles vote for their class with
  weight ``exp(sim / T)``, ``T = 0.07``; votes are normalised to sum to 1 (a softmax over the
  k similarities, as GPFM's code does), which gives the class probabilities.
* :func:`retrieval` -- GPFM ``ROI_tasks/roi_retrieval.py``: features are z-scored with the
  database mean and standard deviation (``torch.var`` is unbiased, so ``ddof=1``; a constant
  feature keeps std 1); Euclidean distances; the ``k = number of classes`` nearest database
  tiles vote 1.0, 0.9, 0.8, ... (clamped at 0 beyond ten neighbours, where GPFM's loop would
  turn negative); the classes ranked by votes give macro top-1/3/5 accuracy (the mean over
  classes of the fraction of their queries whose class is among the k best-voted). GPFM applies
  a softmax to the votes, which does not change the ranking. Ties between classes count as
  the expected hit under random tie-breaking. A top-k with k >= the number of classes is
  always 1 and is reported as n/a.
* :func:`augmentation_retrieval` -- for the embedded default model's card: each query is an
  augmented copy of a tile (:mod:`napari_gpfm.evaluation.augment`), the database is all the
  original tiles; cosine similarity; top-1 / top-5 (the original is among the 5 most similar),
  mean reciprocal rank of the original, and ``class_top1`` (the most similar original has the
  query's class), ties again counted as expected values.

Supervised protocols fit on the training split (the linear probe also uses the validation
split for early stopping); kNN and retrieval have nothing to tune, so their database is the
training and validation tiles together; all three are measured on the test split. Given the
folds of a cross-validation instead of one split, they do this in every fold and measure the
test tiles of all folds together (each tile once). Every
metric comes with a seeded percentile-bootstrap 95% interval over the evaluated tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_gpfm.errors import ParameterError
from napari_gpfm.evaluation.metrics import (
    Estimate,
    auroc_ovr_macro,
    bootstrap,
    classification_metrics,
    tie_aware_hits,
)
from napari_gpfm.evaluation.splits import Split

PROTOCOLS = ("linear", "knn", "retrieval", "augretrieval")


@dataclass(frozen=True)
class ProtocolResult:
    """The metrics of one protocol on one feature set.

    ``n_fit``: tiles the protocol learnt from or searched (training split, or the database);
    ``n_val``: validation tiles (linear probe only); ``n_eval``: tiles measured (test split or
    queries). ``params`` holds the settings used and what training found (e.g. best epoch).
    """

    protocol: str
    metrics: dict[str, Estimate]
    n_fit: int
    n_val: int
    n_eval: int
    params: dict[str, Any] = field(default_factory=dict)


def _features(features: np.ndarray) -> np.ndarray:
    arr = np.asarray(features, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ParameterError("the encoder produced NaN or infinite features; check its weights")
    return arr


def _require_classes(labels: np.ndarray, index: np.ndarray, what: str, minimum: int = 2) -> None:
    present = len(np.unique(labels[index]))
    if present < minimum:
        raise ParameterError(
            f"the {what} split has tiles of {present} class(es); it needs at least {minimum}: "
            "label more regions per class (or change --seed / --split)"
        )


def _folds(split: Split | Sequence[Split]) -> list[Split]:
    """One split, or the folds of a cross-validation, as a list."""
    return [split] if isinstance(split, Split) else list(split)


def _pooled_params(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """A protocol's settings and findings over folds: shared values once, the rest as lists."""
    if len(per_fold) == 1:
        return per_fold[0]
    out: dict[str, Any] = {"folds": len(per_fold)}
    for key in per_fold[0]:
        values = [p[key] for p in per_fold]
        out[key] = values[0] if all(v == values[0] for v in values) else values
    return out


def _classification_result(
    protocol: str, y: np.ndarray, proba: np.ndarray, n_classes: int, n_boot: int, seed: int,
    n_fit: int, n_val: int, params: dict[str, Any],
) -> ProtocolResult:
    def statistic(idx: np.ndarray) -> dict[str, float]:
        return classification_metrics(y[idx], proba[idx], n_classes)

    metrics = bootstrap(statistic, len(y), n_boot=n_boot, seed=seed)
    return ProtocolResult(protocol, metrics, n_fit, n_val, len(y), params)


# ----------------------------------------------------------------------------- linear probe


def linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    split: Split | Sequence[Split],
    n_classes: int,
    *,
    lr: float = 5e-4,
    weight_decay: float = 1e-5,
    eta_min: float = 1e-5,
    batch_size: int = 256,
    epochs: int = 3000,
    patience: int = 100,
    seed: int = 0,
    n_boot: int = 1000,
) -> ProtocolResult:
    """GPFM's linear probe (module notes) on frozen ``features``; metrics on ``split.test``
    (with a sequence of folds: one probe per fold, metrics over all their test tiles)."""
    import torch

    x = _features(features)
    y = np.asarray(labels, dtype=np.int64)
    folds = _folds(split)
    for fold in folds:
        _require_classes(y, fold.train, "training")
        _require_classes(y, fold.val, "validation")
        _require_classes(y, fold.test, "test", minimum=1)
    if epochs < 1 or patience < 1 or batch_size < 1:
        raise ParameterError("--epochs, --patience and the batch size must be at least 1")

    # A D x C layer is far too small for threads: their hand-offs cost 10-50x the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitted = [_train_linear(x, y, fold, n_classes, lr=lr, weight_decay=weight_decay,
                                eta_min=eta_min, batch_size=batch_size, epochs=epochs,
                                patience=patience, seed=seed) for fold in folds]
    finally:
        torch.set_num_threads(threads)
    return _classification_result(
        "linear", np.concatenate([y[f.test] for f in folds]),
        np.concatenate([proba for proba, _ in fitted]), n_classes, n_boot, seed,
        round(np.mean([len(f.train) for f in folds])), round(np.mean([len(f.val) for f in folds])),
        _pooled_params([params for _, params in fitted]),
    )


def _train_linear(
    x: np.ndarray, y: np.ndarray, split: Split, n_classes: int, *, lr: float,
    weight_decay: float, eta_min: float, batch_size: int, epochs: int, patience: int, seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Train on ``split.train`` with early stopping on ``split.val``; the test probabilities
    and what training found."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(int(seed))
    x_train = torch.from_numpy(x[split.train])
    y_train = torch.from_numpy(y[split.train])
    x_val = torch.from_numpy(x[split.val])
    y_val = y[split.val]
    y_val_t = torch.from_numpy(y_val)
    layer = torch.nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    iterations = math.ceil(len(x_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * iterations, eta_min=eta_min
    )

    best_auroc, best_loss, best_epoch, best_state, since_best = -math.inf, math.inf, -1, None, 0
    epoch = -1
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(layer(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            val_logits = layer(x_val)
            val_loss = float(F.cross_entropy(val_logits, y_val_t))
            val_scores = torch.softmax(val_logits, dim=1).numpy()
        val_auroc = auroc_ovr_macro(y_val, val_scores, n_classes)
        since_best += 1
        if val_auroc > best_auroc or (val_auroc == best_auroc and val_loss < best_loss):
            best_auroc, best_loss, best_epoch, since_best = val_auroc, val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        if since_best >= patience:
            break
    layer.load_state_dict(best_state)
    with torch.no_grad():
        proba = torch.softmax(layer(torch.from_numpy(x[split.test])), dim=1).numpy()
    params = {
        "lr": lr, "weight_decay": weight_decay, "eta_min": eta_min, "batch_size": batch_size,
        "max_epochs": epochs, "patience": patience, "epochs_run": epoch + 1,
        "best_epoch": best_epoch + 1, "best_val_auroc": float(best_auroc),
        "best_val_loss": float(best_loss), "seed": int(seed),
    }
    return proba.astype(np.float64), params


# ----------------------------------------------------------------------------- kNN


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_probabilities(
    database: np.ndarray,
    database_labels: np.ndarray,
    queries: np.ndarray,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """DINO-style weighted kNN class probabilities ``(Q, C)`` (module notes).

    The ``k`` most cosine-similar database rows vote ``exp(sim / T)`` for their class; the
    votes of a query are divided by their sum. Equal similarities keep database order.
    """
    if temperature <= 0:
        raise ParameterError(f"temperature={temperature} must be positive")
    db = _l2_normalise(np.asarray(database, dtype=np.float64))
    q = _l2_normalise(np.asarray(queries, dtype=np.float64))
    k = min(int(k), len(db))
    sims = q @ db.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1)
    # exp((s - max) / T) / sum(...) == exp(s / T) / sum(exp(s / T)), without overflow
    weights = np.exp((top_sims - top_sims[:, :1]) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    proba = np.zeros((len(q), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(q)), k)
    np.add.at(proba, (rows, np.asarray(database_labels)[top].ravel()), weights.ravel())
    return proba


def knn_probe(
    features: np.ndarray,
    labels: np.ndarray,
    split: Split | Sequence[Split],
    n_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    seed: int = 0,
    n_boot: int = 1000,
) -> ProtocolResult:
    """Weighted kNN: database = train + val tiles, queries = test tiles (of every fold)."""
    x = _features(features)
    y = np.asarray(labels, dtype=np.int64)
    folds = _folds(split)
    probas, sizes = [], []
    for fold in folds:
        database = np.concatenate([fold.train, fold.val])
        _require_classes(y, database, "training + validation")
        _require_classes(y, fold.test, "test", minimum=1)
        probas.append(knn_probabilities(x[database], y[database], x[fold.test], n_classes, k,
                                        temperature))
        sizes.append(len(database))
    params = _pooled_params([{"k": min(k, n), "temperature": temperature,
                              "similarity": "cosine"} for n in sizes])
    return _classification_result("knn", np.concatenate([y[f.test] for f in folds]),
                                  np.concatenate(probas), n_classes, n_boot, seed,
                                  round(np.mean(sizes)), 0, params)


# ----------------------------------------------------------------------------- retrieval


def zscore(database: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays standardised with the database's per-feature mean and std (``ddof=1``).

    A feature that is constant over the database keeps std 1 (it is then 0 everywhere in the
    database and shifts queries uniformly, adding nothing to their ranking).
    """
    db = np.asarray(database, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    mean = db.mean(axis=0, keepdims=True)
    std = db.std(axis=0, ddof=1, keepdims=True) if len(db) > 1 else np.ones_like(mean)
    std = np.where(std > 0, std, 1.0)
    return (db - mean) / std, (q - mean) / std


def retrieval_votes(
    database: np.ndarray, database_labels: np.ndarray, queries: np.ndarray, n_classes: int
) -> np.ndarray:
    """Class votes ``(Q, C)`` from the ``n_classes`` nearest (Euclidean) database rows.

    Neighbour ``j`` (0 = nearest) votes ``max(1 - 0.1 j, 0)``. Inputs are used as given (z-score
    them first with :func:`zscore`). Votes are kept in tenths as integers, so equal vote
    totals are exactly equal.
    """
    db = np.asarray(database, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    k = min(n_classes, len(db))
    d2 = (q * q).sum(1)[:, None] - 2.0 * q @ db.T + (db * db).sum(1)[None, :]
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
    tenths = np.maximum(10 - np.arange(k), 0)
    votes = np.zeros((len(q), n_classes), dtype=np.int64)
    rows = np.repeat(np.arange(len(q)), k)
    np.add.at(votes, (rows, np.asarray(database_labels)[nearest].ravel()), np.tile(tenths, len(q)))
    return votes


def retrieval(
    features: np.ndarray,
    labels: np.ndarray,
    split: Split | Sequence[Split],
    n_classes: int,
    *,
    ks: tuple[int, ...] = (1, 3, 5),
    seed: int = 0,
    n_boot: int = 1000,
) -> ProtocolResult:
    """GPFM's ROI retrieval: macro top-k accuracy of test queries against train + val (over
    the test tiles of every fold)."""
    x = _features(features)
    y = np.asarray(labels, dtype=np.int64)
    folds = _folds(split)
    higher_parts, tied_parts, sizes = [], [], []
    for fold in folds:
        database = np.concatenate([fold.train, fold.val])
        _require_classes(y, database, "training + validation")
        _require_classes(y, fold.test, "test", minimum=1)
        db, q = zscore(x[database], x[fold.test])
        votes = retrieval_votes(db, y[database], q, n_classes)
        target = votes[np.arange(len(q)), y[fold.test]][:, None]
        higher_parts.append((votes > target).sum(axis=1))
        tied_parts.append((votes == target).sum(axis=1) - 1)
        sizes.append(len(database))
    y_test = np.concatenate([y[f.test] for f in folds])
    hits, _ = tie_aware_hits(np.concatenate(higher_parts), np.concatenate(tied_parts), ks)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        out = {}
        present = np.unique(y_test[idx])
        for k in ks:
            if k >= n_classes:
                out[f"top{k}"] = math.nan
                continue
            out[f"top{k}"] = float(np.mean([hits[k][idx][y_test[idx] == c].mean()
                                            for c in present]))
        return out

    metrics = bootstrap(statistic, len(y_test), n_boot=n_boot, seed=seed)
    params = _pooled_params([{"neighbours": min(n_classes, n), "distance": "euclidean (z-scored)",
                              "votes": "1.0, 0.9, 0.8, ..."} for n in sizes])
    return ProtocolResult("retrieval", metrics, round(np.mean(sizes)), 0, len(y_test), params)


# ----------------------------------------------------------------------------- augmentation


def augmentation_retrieval(
    originals: np.ndarray,
    augmented: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    n_boot: int = 1000,
    params: dict[str, Any] | None = None,
) -> ProtocolResult:
    """Find each tile's original from its augmented copy among all originals (module notes).

    ``originals[i]`` and ``augmented[i]`` are the features of tile ``i`` and of its copy.
    """
    db = _l2_normalise(_features(originals).astype(np.float64))
    q = _l2_normalise(_features(augmented).astype(np.float64))
    if db.shape != q.shape:
        raise ValueError(f"originals {db.shape} and augmented {q.shape} features must match")
    y = np.asarray(labels, dtype=np.int64)
    sims = q @ db.T
    own = np.diag(sims)[:, None]
    higher = (sims > own).sum(axis=1)
    tied = (sims == own).sum(axis=1) - 1
    hits, reciprocal = tie_aware_hits(higher, tied, (1, 5))
    best = sims.max(axis=1, keepdims=True)
    at_best = sims == best
    class_top1 = (at_best & (y[None, :] == y[:, None])).sum(axis=1) / at_best.sum(axis=1)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        return {
            "top1": float(hits[1][idx].mean()),
            "top5": float(hits[5][idx].mean()),
            "mrr": float(reciprocal[idx].mean()),
            "class_top1": float(class_top1[idx].mean()),
        }

    metrics = bootstrap(statistic, len(q), n_boot=n_boot, seed=seed)
    details = {"similarity": "cosine", "database": len(db), "augmentation_seed": int(seed)}
    if params:
        details["augmentation"] = params
    return ProtocolResult("augretrieval", metrics, len(db), 0, len(q), details)
