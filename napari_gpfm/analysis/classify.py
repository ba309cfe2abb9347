"""A linear probe on tile features: learn tissue classes from a few labelled regions.

The probe is a class-balanced logistic regression on standardised features. It is saved as a
single ``.npz`` of plain arrays plus a JSON metadata string (never a pickle), together with the
encoder and tiling it was trained on, so it is never applied to features it does not fit.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from napari_gpfm.analysis._io import atomic_output
from napari_gpfm.analysis.colours import categorical_colours, hex_to_rgb, rgb_to_hex
from napari_gpfm.analysis.geometry import Roi, tiles_in_roi
from napari_gpfm.errors import ParameterError, StoreError

PROBE_FORMAT = "napari-gpfm/linear-probe"
PROBE_VERSION = 1
_ARRAY_KEYS = ("coef", "intercept", "scaler_mean", "scaler_scale", "colours", "metadata")


@dataclass(frozen=True)
class CrossValidation:
    """Stratified k-fold scores of the probe; ``reason`` says why they are None if they are."""

    folds: int | None
    accuracy: float | None
    balanced_accuracy: float | None
    reason: str | None = None


def _as_colours(colours: Sequence | np.ndarray | None, n: int) -> np.ndarray:
    if colours is None:
        return categorical_colours(n)
    rows = [hex_to_rgb(c) if isinstance(c, str) else tuple(c) for c in colours]
    arr = np.asarray(rows, dtype=np.int64)
    if arr.shape != (n, 3) or arr.min() < 0 or arr.max() > 255:
        raise ParameterError(f"colours must be {n} RGB triples in 0..255 (one per class)")
    return arr.astype(np.uint8)


def _encode_labels(labels: Sequence | np.ndarray, class_names: list[str]) -> np.ndarray:
    """Class names or class indices -> int64 indices into ``class_names``."""
    values = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
    lookup = {name: i for i, name in enumerate(class_names)}
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, str):
            if value not in lookup:
                raise ParameterError(
                    f"label {value!r} is not one of the classes {class_names}; "
                    "add it to class_names or fix the ROI's class"
                )
            out[i] = lookup[value]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= int(value) < len(class_names):
                raise ParameterError(
                    f"label {value} is out of range for {len(class_names)} classes {class_names}"
                )
            out[i] = int(value)
        else:
            raise ParameterError(f"label {value!r} must be a class name or a class index")
    return out


def _softmax_probabilities(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] == 1:
        # Binary logistic regression has one logit: p(class 1) = sigmoid(z).
        from scipy.special import expit

        p1 = expit(logits[:, 0])
        return np.column_stack([1.0 - p1, p1])
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _fit_arrays(
    x: np.ndarray, y: np.ndarray, c: float, seed: int, max_iter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Standardise then fit; return (coef, intercept, mean, scale, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaler.transform(x), y)
    converged = bool(np.all(np.asarray(model.n_iter_) < max_iter))
    return model.coef_, model.intercept_, scaler.mean_, scaler.scale_, converged


class LinearProbe:
    """Class-balanced logistic regression on standardised tile features.

    Build with ``LinearProbe(encoder_id=..., tiling_id=...)`` then :meth:`fit`, or
    :meth:`load` a saved one. ``cv`` holds the cross-validated accuracy measured by ``fit``.
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        colours: Sequence | np.ndarray | None = None,
        encoder_id: str | None = None,
        tiling_id: str | None = None,
        c: float = 1.0,
        max_iter: int = 2000,
    ) -> None:
        if not c > 0:
            raise ParameterError(f"regularisation C={c} must be > 0")
        self.class_names: list[str] = [str(n) for n in class_names] if class_names else []
        self._colours_arg = colours
        self.colours: np.ndarray | None = None
        self.encoder_id = encoder_id
        self.tiling_id = tiling_id
        self.c = float(c)
        self.max_iter = int(max_iter)
        self.coef: np.ndarray | None = None
        self.intercept: np.ndarray | None = None
        self.scaler_mean: np.ndarray | None = None
        self.scaler_scale: np.ndarray | None = None
        self.cv: CrossValidation | None = None
        self.train_counts: dict[str, int] = {}
        self.converged: bool | None = None

    @property
    def is_fitted(self) -> bool:
        return self.coef is not None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        self._require_fitted()
        return int(self.coef.shape[1])

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ParameterError("the probe is not trained yet; fit it or load a saved probe")

    def fit(
        self,
        features: np.ndarray,
        labels: Sequence | np.ndarray,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
    ) -> LinearProbe:
        """Train on labelled tiles; ``labels`` are class names or indices into ``class_names``.

        Every class needs at least one labelled tile. When every class has at least two,
        stratified k-fold cross-validation (k = min(5, smallest class count)) measures accuracy
        and balanced accuracy on held-out tiles; otherwise ``cv`` gives the reason it could not.
        """
        from sklearn.metrics import accuracy_score, balanced_accuracy_score
        from sklearn.model_selection import StratifiedKFold

        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ParameterError(f"features must have shape (N, D) with N > 0, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ParameterError("features contain NaN or infinity; re-run the embedding")
        if class_names is not None:
            self.class_names = [str(n) for n in class_names]
        if not self.class_names:
            found = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
            if not all(isinstance(v, str) for v in found):
                raise ParameterError("give class_names when the labels are class indices")
            self.class_names = sorted(set(found))
        if len(set(self.class_names)) != len(self.class_names):
            raise ParameterError(f"class names must be unique, got {self.class_names}")
        if len(self.class_names) < 2:
            raise ParameterError(
                f"a probe needs at least 2 classes, got {self.class_names}; label another class"
            )
        y = _encode_labels(labels, self.class_names)
        if len(y) != len(x):
            raise ParameterError(f"{len(y)} labels for {len(x)} feature rows; give one per tile")
        counts = np.bincount(y, minlength=self.n_classes)
        for name, count in zip(self.class_names, counts, strict=True):
            if count == 0:
                raise ParameterError(
                    f"class {name!r} has no labelled tiles; draw an ROI of it over tissue"
                )
        self.colours = _as_colours(self._colours_arg, self.n_classes)
        self.train_counts = {name: int(n) for name, n in zip(self.class_names, counts, strict=True)}

        smallest = int(counts.min())
        if smallest >= 2:
            folds = min(5, smallest)
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            held_out = np.empty_like(y)
            for train, test in splitter.split(x, y):
                coef, intercept, mean, scale, _ = _fit_arrays(
                    x[train], y[train], self.c, seed, self.max_iter
                )
                probs = self._probabilities(x[test], coef, intercept, mean, scale, self.n_classes)
                held_out[test] = np.argmax(probs, axis=1)
            self.cv = CrossValidation(
                folds=folds,
                accuracy=float(accuracy_score(y, held_out)),
                balanced_accuracy=float(balanced_accuracy_score(y, held_out)),
            )
        else:
            name = self.class_names[int(np.argmin(counts))]
            self.cv = CrossValidation(
                folds=None,
                accuracy=None,
                balanced_accuracy=None,
                reason=f"class {name!r} has only {smallest} labelled tile; "
                "cross-validation needs at least 2 per class",
            )
        (self.coef, self.intercept, self.scaler_mean, self.scaler_scale, self.converged) = (
            _fit_arrays(x, y, self.c, seed, self.max_iter)
        )
        return self

    @staticmethod
    def _probabilities(
        x: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        n_classes: int,
    ) -> np.ndarray:
        logits = ((x - mean) / scale) @ coef.T + intercept
        probs = _softmax_probabilities(logits)
        if probs.shape[1] != n_classes:
            raise ParameterError(
                f"probe has {probs.shape[1]} outputs for {n_classes} classes; retrain it"
            )
        return probs

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` float64, columns in ``class_names`` order."""
        self._require_fitted()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ParameterError(
                f"probe expects features of shape (N, {self.feature_dim}), got {x.shape}; "
                "use embeddings from the encoder the probe was trained on"
            )
        return self._probabilities(
            x, self.coef, self.intercept, self.scaler_mean, self.scaler_scale, self.n_classes
        )

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Most probable class index per tile, ``(N,)`` int64."""
        return np.argmax(self.predict_proba(features), axis=1).astype(np.int64)

    def metadata(self) -> dict:
        """JSON-ready description stored next to the weights."""
        self._require_fitted()
        return {
            "format": PROBE_FORMAT,
            "version": PROBE_VERSION,
            "class_names": self.class_names,
            "colours": [rgb_to_hex(c) for c in self.colours],
            "encoder_id": self.encoder_id,
            "tiling_id": self.tiling_id,
            "feature_dim": self.feature_dim,
            "C": self.c,
            "max_iter": self.max_iter,
            "converged": self.converged,
            "train_counts": self.train_counts,
            "cross_validation": asdict(self.cv) if self.cv else None,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe as one ``.npz`` (plain arrays + JSON metadata), atomically."""
        self._require_fitted()
        with atomic_output(path, "probe") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                coef=self.coef,
                intercept=self.intercept,
                scaler_mean=self.scaler_mean,
                scaler_scale=self.scaler_scale,
                colours=self.colours,
                metadata=np.array(json.dumps(self.metadata())),
            )
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected_encoder_id: str | None = None,
        expected_tiling_id: str | None = None,
    ) -> LinearProbe:
        """Load a saved probe, refusing one trained on another encoder or tiling.

        A probe saved without an encoder or tiling id is accepted for any.
        """
        src = Path(path)
        if not src.is_file():
            raise StoreError(f"probe file {src} not found")
        if not zipfile.is_zipfile(src):  # numpy would try it as a pickle and say so
            raise StoreError(
                f"{src} is not a napari-gpfm probe: a probe is the .npz that `gpfm classify "
                "train --out` or the ROI classifier's Save writes"
            )
        try:
            with np.load(src, allow_pickle=False) as npz:
                missing = [k for k in _ARRAY_KEYS if k not in npz.files]
                if missing:
                    raise StoreError(f"{src} is not a napari-gpfm probe (missing {missing})")
                arrays = {k: npz[k] for k in _ARRAY_KEYS}
            meta = json.loads(str(arrays["metadata"]))
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            # numpy's own text may advise loading pickles; a probe never holds one.
            reason = "it holds pickled objects" if "pickle" in str(exc) else str(exc)
            raise StoreError(f"{src} is not a readable napari-gpfm probe .npz ({reason})") from None
        if not isinstance(meta, dict) or meta.get("format") != PROBE_FORMAT:
            raise StoreError(f"{src} is not a napari-gpfm probe (format marker missing)")
        if meta.get("version") != PROBE_VERSION:
            raise StoreError(
                f"probe {src} has format version {meta.get('version')}, this napari-gpfm reads "
                f"version {PROBE_VERSION}; retrain the probe"
            )
        trained_on = meta.get("encoder_id")
        if expected_encoder_id is not None and trained_on not in (None, expected_encoder_id):
            raise StoreError(
                f"probe {src} was trained on encoder {trained_on!r} but these features come "
                f"from {expected_encoder_id!r}; train a new probe on this encoder's embeddings"
            )
        tiled_with = meta.get("tiling_id")
        if expected_tiling_id is not None and tiled_with not in (None, expected_tiling_id):
            raise StoreError(
                f"probe {src} was trained on tiling {tiled_with!r} but these features use "
                f"tiling {expected_tiling_id!r}; embed with the probe's tiling or retrain"
            )
        probe = cls(
            class_names=meta["class_names"],
            colours=meta["colours"],
            encoder_id=trained_on,
            tiling_id=tiled_with,
            c=float(meta.get("C", 1.0)),
            max_iter=int(meta.get("max_iter", 2000)),
        )
        probe.colours = np.asarray(arrays["colours"], dtype=np.uint8)
        probe.coef = np.asarray(arrays["coef"], dtype=np.float64)
        probe.intercept = np.asarray(arrays["intercept"], dtype=np.float64)
        probe.scaler_mean = np.asarray(arrays["scaler_mean"], dtype=np.float64)
        probe.scaler_scale = np.asarray(arrays["scaler_scale"], dtype=np.float64)
        expected_rows = 1 if probe.n_classes == 2 else probe.n_classes
        if probe.coef.ndim != 2 or probe.coef.shape[0] != expected_rows:
            raise StoreError(f"probe {src} is corrupted (weights do not match its classes)")
        probe.converged = meta.get("converged")
        probe.train_counts = dict(meta.get("train_counts") or {})
        cv = meta.get("cross_validation")
        if isinstance(cv, dict):
            probe.cv = CrossValidation(
                folds=cv.get("folds"),
                accuracy=cv.get("accuracy"),
                balanced_accuracy=cv.get("balanced_accuracy"),
                reason=cv.get("reason"),
            )
        return probe


def area_table(
    pred: np.ndarray,
    class_names: Sequence[str],
    tile_area_mm2: float,
    colours: Sequence | np.ndarray | None = None,
) -> list[dict]:
    """One row per class: ``class, colour (#rrggbb), tiles, area_mm2, fraction``."""
    names = [str(n) for n in class_names]
    lab = np.asarray(pred, dtype=np.int64).reshape(-1)
    if lab.size and (lab.min() < 0 or lab.max() >= len(names)):
        raise ParameterError(
            f"predicted classes must be in [0, {len(names)}), got {lab.min()}..{lab.max()}"
        )
    palette = _as_colours(colours, len(names))
    counts = np.bincount(lab, minlength=len(names))
    total = max(int(counts.sum()), 1)
    return [
        {
            "class": name,
            "colour": rgb_to_hex(palette[i]),
            "tiles": int(counts[i]),
            "area_mm2": float(counts[i] * tile_area_mm2),
            "fraction": float(counts[i] / total),
        }
        for i, name in enumerate(names)
    ]


def labels_from_rois(
    coords: np.ndarray,
    tile_size_l0: float,
    rois_with_class: Iterable[tuple[Roi | Sequence | np.ndarray, Hashable]],
) -> tuple[np.ndarray, np.ndarray]:
    """Label the tiles under class-tagged ROIs: ``(indices ascending, labels)``.

    Several ROIs may share a class. A tile under ROIs of different classes takes the class of
    the smallest one: a region drawn inside another refines it (an inflamed patch inside the
    epidermis), as QuPath nests an annotation in the one around it. A tile whose smallest ROIs
    are of different classes and equal in area (the same region labelled twice) is dropped: its
    label is ambiguous and training on it would teach the probe both answers.
    """
    n = len(coords)
    classes: list[Hashable] = []
    assigned = np.full(n, -1, dtype=np.int64)
    area = np.full(n, np.inf)
    conflict = np.zeros(n, dtype=bool)
    for roi, cls_value in rois_with_class:
        region = Roi.coerce(roi)
        if cls_value not in classes:
            classes.append(cls_value)
        code = classes.index(cls_value)
        idx = tiles_in_roi(coords, tile_size_l0, region)
        size = region.area
        smaller = idx[size < area[idx]]
        tied = idx[(size == area[idx]) & (assigned[idx] != code)]
        assigned[smaller], area[smaller], conflict[smaller] = code, size, False
        conflict[tied] = True
    keep = np.flatnonzero((assigned >= 0) & ~conflict).astype(np.int64)
    labels = np.array([classes[c] for c in assigned[keep]])
    if keep.size == 0:
        labels = np.zeros(0, dtype=np.int64)
    return keep, labels


def left_out_note(
    classes: Iterable[Hashable],
    sources: Iterable[tuple[Iterable[tuple[Roi | Sequence | np.ndarray, Hashable]], np.ndarray,
                            float]],
) -> str:
    """Why ``classes`` got no training tile from :func:`labels_from_rois`, in the user's words.

    ``sources``: ``(rois_with_class, coords, tile_size_l0)`` of each slide the regions were
    drawn on. Either a class's regions hold no embedded tile (background is not embedded), or
    every tile they hold lies in a smaller region of another class (or one of equal size).
    """
    slides = [([(Roi.coerce(roi), name) for roi, name in rois], coords, float(size))
              for rois, coords, size in sources]
    empty, covered = [], []
    for name in classes:
        holds = any(len(tiles_in_roi(coords, size, roi))
                    for pairs, coords, size in slides for roi, c in pairs if c == name)
        (covered if holds else empty).append(repr(str(name)))
    parts = []
    if empty:
        parts.append(f"left out {', '.join(empty)}: no embedded tile has its centre in those "
                     "regions (only tissue is embedded, so background regions hold none)")
    if covered:
        parts.append(f"left out {', '.join(covered)}: every tile of those regions lies in a "
                     "smaller region of another class, which takes it (or one of the same size, "
                     "which makes it ambiguous)")
    return "; ".join(parts)
