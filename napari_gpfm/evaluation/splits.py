"""Grouped train / validation / test splits that keep neighbouring tiles together.

Tiles cut from one region overlap in content (and in pixels, with a stride below the tile
size), so a random tile-level split lets a probe "recognise" test tiles from their neighbours.
Every split here assigns whole **groups** to one side:

* ``region`` (the default, used by ``gpfm eval``): a group is a labelled region (a GeoJSON
  polygon, a CSV ``group`` or row, an image sub-folder or image). Held-out regions are
  anatomically separate places, the closest a single slide gets to unseen data.
* ``band``: a group is a horizontal band of the slide: the level-0 ``y`` range of the labelled
  tiles of each slide is cut into ``n_bands`` equal bands. Leakage is then limited to the tiles
  touching a band edge; use it when each class has too few regions.

With ``folds`` (:func:`make_folds`), the groups are dealt into ``k`` folds instead and each
fold is the test split once, the next fold its validation split and the rest its training
split: every tile is tested exactly once, which a small labelled set needs for its numbers to
mean anything (one held-out split of a few regions can turn on a single tile). Each class's
groups are dealt round-robin (largest first), so every class is spread over the folds.

The assignment is deterministic for a seed. Groups are shuffled with the seed; first, for each
class (the class with the fewest groups first), one of its groups goes to the training split,
one to the test split and, when it has a third, one to the validation split (largest group to
training); then every remaining group (largest first) goes to the split whose per-class tile
counts are furthest below ``fractions`` of the class totals. Every class therefore appears in
training and test; a class with a single group cannot be evaluated without leakage and raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_gpfm.errors import ParameterError

SPLIT_METHODS = ("region", "band")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Split:
    """Tile indices of each side of a grouped split (ascending, disjoint)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    method: str
    seed: int
    n_groups: int

    def describe(self, labels: np.ndarray, class_names: Sequence[str]) -> str:
        """One line: tiles per side and per class."""
        parts = []
        for name in SPLIT_NAMES:
            idx = getattr(self, name)
            counts = np.bincount(labels[idx], minlength=len(class_names))
            per_class = ", ".join(f"{c} {n}" for c, n in zip(class_names, counts, strict=True))
            parts.append(f"{name} {len(idx)} ({per_class})")
        return (f"split by {self.method} ({self.n_groups} groups, seed {self.seed}): "
                + "; ".join(parts))


def band_groups(centres: np.ndarray, sources: np.ndarray, n_bands: int = 5) -> np.ndarray:
    """Group id per tile: its slide and its band among ``n_bands`` equal bands of tile ``y``."""
    if isinstance(n_bands, bool) or not isinstance(n_bands, int | np.integer) or n_bands < 2:
        raise ParameterError(f"--bands {n_bands!r}: give a whole number of bands, at least 2")
    y = np.asarray(centres, dtype=np.float64)[:, 1]
    if not np.all(np.isfinite(y)):
        raise ParameterError(
            "--split band needs tile positions, and image-folder tiles have none; use "
            "--split region (each image or sub-folder is a group)"
        )
    out = np.zeros(len(y), dtype=np.int64)
    for source in np.unique(sources):
        mine = sources == source
        lo, hi = y[mine].min(), y[mine].max()
        height = (hi - lo) / n_bands if hi > lo else 1.0
        band = np.minimum(((y[mine] - lo) // height).astype(np.int64), n_bands - 1)
        out[mine] = int(source) * n_bands + band
    return out


def grouped_split(
    labels: np.ndarray,
    groups: np.ndarray,
    class_names: Sequence[str],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    method: str = "region",
) -> Split:
    """Assign whole groups to train / val / test (see the module notes for the rule)."""
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or np.any(frac < 0) or not np.isclose(frac.sum(), 1.0):
        raise ParameterError(f"split fractions {tuple(fractions)} must be 3 values summing to 1")
    n_classes = len(class_names)
    unique_groups, group_of_tile = np.unique(groups, return_inverse=True)
    n_groups = len(unique_groups)
    # counts[g, c]: tiles of class c in group g
    counts = np.zeros((n_groups, n_classes), dtype=np.float64)
    np.add.at(counts, (group_of_tile, labels), 1.0)
    sizes = counts.sum(axis=1)

    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n_groups)
    # Largest first; the seeded shuffle decides among equal sizes (stable sort keeps it).
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    rank = np.empty(n_groups, dtype=np.int64)
    rank[order] = np.arange(n_groups)

    side = np.full(n_groups, -1, dtype=np.int64)
    groups_per_class = (counts > 0).sum(axis=0)
    lonely = [class_names[c] for c in range(n_classes) if groups_per_class[c] == 1]
    if lonely:
        what = "region" if method == "region" else "band"
        raise ParameterError(
            f"class(es) {', '.join(repr(c) for c in lonely)} have tiles in only one {what}; "
            f"a {method} split holds whole {what}s out, so each class needs at least 2 "
            f"(3 for a validation set): label more regions"
            + (" or use --split band" if method == "region" else " or use --split region")
        )
    tally = np.zeros((3, n_classes), dtype=np.float64)
    for c in np.argsort(groups_per_class, kind="stable"):
        present = [s for s in range(3) if tally[s, c] > 0]
        for target in (0, 2, 1):  # train, test, then validation
            if target in present:
                continue
            free = np.flatnonzero((counts[:, c] > 0) & (side < 0))
            if len(free) == 0:
                break
            g = int(free[np.argmin(rank[free])])
            side[g] = target
            tally[target] += counts[g]
            present.append(target)

    goal = frac[:, None] * counts.sum(axis=0)[None, :]
    for g in order:
        if side[g] >= 0:
            continue
        before = np.square(tally - goal).sum(axis=1)
        after = np.square(tally + counts[g] - goal).sum(axis=1)
        best = int(np.argmin(after - before))
        side[g] = best
        tally[best] += counts[g]

    tile_side = side[group_of_tile]
    return Split(
        train=np.flatnonzero(tile_side == 0),
        val=np.flatnonzero(tile_side == 1),
        test=np.flatnonzero(tile_side == 2),
        method=method,
        seed=int(seed),
        n_groups=n_groups,
    )


def make_split(
    tileset,
    method: str = "region",
    seed: int = 0,
    n_bands: int = 5,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Split:
    """The grouped split of a :class:`~napari_gpfm.evaluation.tilesets.TileSet`."""
    if method not in SPLIT_METHODS:
        raise ParameterError(f"--split {method!r}: use one of {', '.join(SPLIT_METHODS)}")
    if method == "region":
        groups = tileset.groups
    else:
        groups = band_groups(tileset.centres, tileset.sources, n_bands)
    return grouped_split(tileset.labels, groups, tileset.class_names, seed, fractions, method)


def grouped_folds(
    labels: np.ndarray,
    groups: np.ndarray,
    class_names: Sequence[str],
    n_folds: int,
    seed: int = 0,
    method: str = "region",
) -> list[Split]:
    """``n_folds`` splits in which each group is tested once (see the module notes)."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 3:
        raise ParameterError(
            f"--folds {n_folds!r}: cross-validation needs at least 3 folds (test, validation "
            "and training each take one)"
        )
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    n_classes = len(class_names)
    unique_groups, group_of_tile = np.unique(groups, return_inverse=True)
    n_groups = len(unique_groups)
    if n_groups < n_folds:
        raise ParameterError(
            f"--folds {n_folds}: the tiles form only {n_groups} {method}s; use at most "
            f"{n_groups} folds, or label more regions"
        )
    counts = np.zeros((n_groups, n_classes), dtype=np.float64)
    np.add.at(counts, (group_of_tile, labels), 1.0)
    groups_per_class = (counts > 0).sum(axis=0)
    lonely = [class_names[c] for c in range(n_classes) if groups_per_class[c] == 1]
    if lonely:
        raise ParameterError(
            f"class(es) {', '.join(repr(c) for c in lonely)} have tiles in only one {method}; "
            "cross-validation holds whole groups out, so each class needs at least 2: label "
            "more regions"
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n_groups)
    sizes = counts.sum(axis=1)
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    fold_of = np.full(n_groups, -1, dtype=np.int64)
    tally = np.zeros((n_folds, n_classes), dtype=np.float64)
    # Rarest class first: its few groups must land in different folds.
    for c in np.argsort(groups_per_class, kind="stable"):
        for g in order:
            if counts[g, c] == 0 or fold_of[g] >= 0:
                continue
            # The fold holding the fewest tiles of this class (then of all classes).
            key = tally[:, c] * (tally.sum() + 1.0) + tally.sum(axis=1)
            f = int(np.argmin(key))
            fold_of[g] = f
            tally[f] += counts[g]
    tile_fold = fold_of[group_of_tile]
    classes_of_fold = [set(np.flatnonzero(tally[f] > 0).tolist()) for f in range(n_folds)]
    folds = []
    for f in range(n_folds):
        # Validation: the next fold whose removal still leaves every class in training (a
        # class with two groups would otherwise vanish from training in some folds).
        candidates = [(f + d) % n_folds for d in range(1, n_folds)]
        val = next((v for v in candidates
                    if set().union(*(classes_of_fold[o] for o in range(n_folds)
                                     if o not in (f, v))) >= classes_of_fold[f]),
                   candidates[0])
        folds.append(Split(
            train=np.flatnonzero((tile_fold != f) & (tile_fold != val)),
            val=np.flatnonzero(tile_fold == val),
            test=np.flatnonzero(tile_fold == f),
            method=f"{method}, fold {f + 1} of {n_folds}",
            seed=int(seed),
            n_groups=n_groups,
        ))
    return folds


def describe_folds(folds: Sequence[Split], labels: np.ndarray,
                   class_names: Sequence[str]) -> str:
    """One line: how many folds, and the tiles of each class tested over all of them."""
    tested = np.concatenate([f.test for f in folds])
    counts = np.bincount(np.asarray(labels)[tested], minlength=len(class_names))
    per_class = ", ".join(f"{c} {n}" for c, n in zip(class_names, counts, strict=True))
    train = np.mean([len(f.train) for f in folds])
    base = folds[0].method.split(",")[0]
    return (f"{len(folds)}-fold cross-validation by {base} ({folds[0].n_groups} groups, seed "
            f"{folds[0].seed}): every tile tested once ({len(tested)}: {per_class}); "
            f"{train:.0f} training tiles per fold on average")


def make_folds(
    tileset,
    n_folds: int,
    method: str = "region",
    seed: int = 0,
    n_bands: int = 5,
) -> list[Split]:
    """The cross-validation folds of a :class:`~napari_gpfm.evaluation.tilesets.TileSet`."""
    if method not in SPLIT_METHODS:
        raise ParameterError(f"--split {method!r}: use one of {', '.join(SPLIT_METHODS)}")
    groups = tileset.groups if method == "region" else band_groups(
        tileset.centres, tileset.sources, n_bands)
    return grouped_folds(tileset.labels, groups, tileset.class_names, n_folds, seed, method)
