"""Encoder evaluation: tile sets, grouped splits, metrics, GPFM's protocols, the report."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from napari_gpfm.analysis.geojson import read_geojson, shapes_to_geojson, write_geojson
from napari_gpfm.analysis.geometry import points_in_polygon
from napari_gpfm.errors import ParameterError
from napari_gpfm.evaluation.augment import AugmentParams, augment_tiles
from napari_gpfm.evaluation.features import ColourHistogram, parse_model
from napari_gpfm.evaluation.metrics import (
    Estimate,
    average_ranks,
    bootstrap,
    classification_metrics,
    tie_aware_hits,
)
from napari_gpfm.evaluation.protocols import (
    augmentation_retrieval,
    knn_probabilities,
    knn_probe,
    linear_probe,
    retrieval,
    retrieval_votes,
    zscore,
)
from napari_gpfm.evaluation.report import EvaluationReport
from napari_gpfm.evaluation.splits import (
    band_groups,
    grouped_folds,
    grouped_split,
    make_folds,
    make_split,
)
from napari_gpfm.evaluation.tilesets import (
    load_tileset,
    tiles_from_csv,
    tiles_from_imagefolder,
    tiles_from_regions,
)

REGIONS = REPO_ROOT / "data" / "labels" / "cmu1_regions.geojson"
CLASSES = ("a", "b", "c", "d")


def _grouped_data(rng, n_classes=4, groups_per_class=5, per_group=12, dim=16, spread=None):
    """Labels with ``groups_per_class`` groups each; features separable when ``spread`` is set."""
    labels = np.repeat(np.arange(n_classes), groups_per_class * per_group)
    groups = np.repeat(np.arange(n_classes * groups_per_class), per_group)
    if spread is None:
        features = rng.normal(size=(len(labels), dim))
    else:
        centres = rng.normal(size=(n_classes, dim)) * spread
        features = centres[labels] + rng.normal(size=(len(labels), dim))
    names = [f"c{i}" for i in range(n_classes)]
    return features.astype(np.float32), labels, groups, names


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 60)
    proba = rng.random((60, 4)) + np.eye(4)[y] * rng.random((60, 1))
    proba /= proba.sum(axis=1, keepdims=True)
    pred = proba.argmax(1)
    ours = classification_metrics(y, proba, 4)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert ours["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert ours["auroc_macro"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))


def test_average_ranks_share_ties():
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])),
                               [4.0, 1.0, 4.0, 2.0, 4.0])


def test_bootstrap_is_seeded_and_brackets_a_mean():
    values = np.random.default_rng(0).normal(size=200)

    def stat(idx):
        return {"mean": float(values[idx].mean())}

    first = bootstrap(stat, 200, n_boot=300, seed=5)["mean"]
    again = bootstrap(stat, 200, n_boot=300, seed=5)["mean"]
    other = bootstrap(stat, 200, n_boot=300, seed=6)["mean"]
    assert first == again and first != other
    assert first.low < first.value < first.high
    # the standard error of a mean of 200 N(0, 1) is 0.0707: the 95% interval is ~ +-0.14
    assert 0.2 < first.high - first.low < 0.36
    none = bootstrap(stat, 200, n_boot=0)["mean"]
    assert math.isnan(none.low) and str(none) == f"{none.value:.3f}"


def test_tie_aware_hits_by_hand():
    # target strictly first; tied with 1 other for first; 2 above and 1 tie
    hits, rr = tie_aware_hits(np.array([0, 0, 2]), np.array([0, 1, 1]), (1, 3))
    np.testing.assert_allclose(hits[1], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(hits[3], [1.0, 1.0, 0.5])
    np.testing.assert_allclose(rr, [1.0, (1 + 1 / 2) / 2, (1 / 3 + 1 / 4) / 2])


# ----------------------------------------------------------------------------- protocols


@pytest.fixture(scope="module")
def separable():
    features, labels, groups, names = _grouped_data(np.random.default_rng(0), spread=8.0)
    split = grouped_split(labels, groups, names, seed=0)
    return features, labels, split


@pytest.fixture(scope="module")
def random_features():
    features, labels, groups, names = _grouped_data(
        np.random.default_rng(3), groups_per_class=20, per_group=10, dim=32
    )
    split = grouped_split(labels, groups, names, seed=0)
    return features, labels, split


def test_protocols_on_separable_features_are_near_perfect(separable):
    features, labels, split = separable
    for result in (
        linear_probe(features, labels, split, 4, n_boot=200, epochs=150),
        knn_probe(features, labels, split, 4, n_boot=200),
    ):
        for name in ("accuracy", "balanced_accuracy", "f1_macro", "auroc_macro"):
            est = result.metrics[name]
            assert est.value > 0.97, (result.protocol, name, est)
            assert est.low > 0.9 and est.high <= 1.0, (result.protocol, name, est)
    ret = retrieval(features, labels, split, 4, n_boot=200)
    assert ret.metrics["top1"].value > 0.97 and ret.metrics["top1"].low > 0.9
    assert ret.metrics["top3"].value == 1.0
    assert math.isnan(ret.metrics["top5"].value)  # k >= classes: always 1, reported n/a
    assert ret.n_fit == len(split.train) + len(split.val) and ret.n_eval == len(split.test)


def test_protocols_on_random_features_are_at_chance(random_features):
    features, labels, split = random_features
    linear = linear_probe(features, labels, split, 4, n_boot=200)
    knn = knn_probe(features, labels, split, 4, n_boot=200)
    for result in (linear, knn):
        bal, auc = result.metrics["balanced_accuracy"], result.metrics["auroc_macro"]
        assert abs(bal.value - 0.25) < 0.1, (result.protocol, bal)
        assert abs(auc.value - 0.5) < 0.1, (result.protocol, auc)
        assert bal.low < 0.25 + 0.05 and auc.low < 0.5  # chance lies in (or by) the interval
    ret = retrieval(features, labels, split, 4, n_boot=200)
    assert abs(ret.metrics["top1"].value - 0.25) < 0.1
    assert abs(ret.metrics["top3"].value - 0.75) < 0.1


def test_linear_probe_stops_early_and_keeps_the_best_epoch(random_features, separable):
    features, labels, split = random_features
    result = linear_probe(features, labels, split, 4, n_boot=0, epochs=3000, patience=7)
    p = result.params
    assert p["epochs_run"] == p["best_epoch"] + 7 < 3000
    again = linear_probe(features, labels, split, 4, n_boot=0, epochs=3000, patience=7)
    assert again.metrics == result.metrics  # seeded
    # separable: validation AUROC is 1.0 at once; a lower validation loss still improves it
    features, labels, split = separable
    easy = linear_probe(features, labels, split, 4, n_boot=0, epochs=60, patience=7)
    assert easy.params["best_val_auroc"] == 1.0 and easy.params["best_epoch"] == 60


def test_linear_probe_needs_two_classes_in_validation():
    labels = np.array([0] * 6 + [1] * 6)
    groups = np.arange(12) // 2  # groups 0-2 class 0, 3-5 class 1
    split = grouped_split(labels, groups, ["x", "y"], seed=0)
    bad = type(split)(train=split.train, val=np.array([0]), test=split.test, method="region",
                      seed=0, n_groups=6)
    with pytest.raises(ParameterError, match="validation split has tiles of 1 class"):
        linear_probe(np.eye(12, dtype=np.float32), labels, bad, 2, n_boot=0)


def test_knn_weighting_by_hand():
    database = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array([0, 1, 1])
    query = np.array([[2.0, 1.0]])  # cosine: 2/sqrt5, 2/sqrt5, 1/sqrt5
    sims = np.array([2.0, 2.0, 1.0]) / math.sqrt(5.0)
    w = np.exp(sims / 0.07)
    expected = np.array([w[0], w[1] + w[2]]) / w.sum()
    np.testing.assert_allclose(knn_probabilities(database, labels, query, 2, k=3), [expected])
    # k = 2: the third neighbour (class 1, least similar) no longer votes
    w2 = w[:2] / w[:2].sum()
    np.testing.assert_allclose(knn_probabilities(database, labels, query, 2, k=2), [w2])
    # a higher temperature flattens the weights towards equal votes
    flat = knn_probabilities(database, labels, query, 2, k=3, temperature=100.0)
    np.testing.assert_allclose(flat, [[1 / 3, 2 / 3]], atol=2e-3)


def test_zscore_uses_database_statistics():
    db = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    q = np.array([[7.0, 12.0]])
    db_z, q_z = zscore(db, q)
    # database mean (3, 10), std with ddof=1: (2, 0 -> 1)
    np.testing.assert_allclose(db_z, [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(q_z, [[2.0, 2.0]])


def test_retrieval_is_scale_free_thanks_to_zscoring():
    rng = np.random.default_rng(4)
    features, labels, groups, names = _grouped_data(rng, spread=6.0, dim=8)
    noisy = np.hstack([features, rng.normal(size=(len(features), 2)) * 1e4]).astype(np.float32)
    split = grouped_split(labels, groups, names, seed=1)
    result = retrieval(noisy, labels, split, 4, n_boot=0)
    assert result.metrics["top1"].value > 0.9
    # without z-scoring the two huge noise dimensions decide the neighbours: chance level
    database = np.concatenate([split.train, split.val])
    raw = retrieval_votes(noisy[database], labels[database], noisy[split.test], 4)
    assert (raw.argmax(1) == labels[split.test]).mean() < 0.5


def test_retrieval_votes_by_hand():
    database = np.array([[0.0], [1.0], [2.0], [3.0], [9.0]])
    labels = np.array([2, 0, 2, 1, 0])
    votes = retrieval_votes(database, labels, np.array([[0.1]]), 3)
    # nearest three: class 2 (1.0), class 0 (0.9), class 2 (0.8): in tenths
    np.testing.assert_array_equal(votes, [[9, 0, 18]])


def test_augmentation_retrieval_finds_originals_and_counts_duplicates_fairly():
    rng = np.random.default_rng(0)
    originals = rng.normal(size=(30, 12))
    labels = np.arange(30) % 3
    result = augmentation_retrieval(originals, originals + rng.normal(size=(30, 12)) * 0.01,
                                    labels, n_boot=50)
    assert result.metrics["top1"].value == 1.0 and result.metrics["mrr"].value == 1.0
    twins = np.vstack([originals[:1], originals])  # tile 0 and 1 are the same tile
    twin_labels = np.r_[labels[:1], labels]
    result = augmentation_retrieval(twins, twins.copy(), twin_labels, n_boot=0)
    per_tile_top1 = (2 * 0.5 + 29 * 1.0) / 31
    assert result.metrics["top1"].value == pytest.approx(per_tile_top1)
    assert result.metrics["mrr"].value == pytest.approx((2 * 0.75 + 29) / 31)
    assert result.metrics["class_top1"].value == 1.0


# ----------------------------------------------------------------------------- features


def test_colour_histogram_counts_colours():
    tiles = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    tiles[0] = (255, 0, 0)
    tiles[1, :4] = (0, 0, 255)
    tiles[1, 4:] = (40, 100, 200)
    tiles[2] = np.random.default_rng(0).integers(0, 256, (8, 8, 3))
    hist = ColourHistogram(bins=8).embed(tiles)
    assert hist.shape == (3, 512) and hist.dtype == np.float32
    np.testing.assert_allclose(hist.sum(1), 512.0, rtol=1e-6)  # density: mean 1 per bin
    assert hist[0, (7 * 8 + 0) * 8 + 0] == 512.0
    assert hist[1, 7] == 256.0 and hist[1, (1 * 8 + 3) * 8 + 6] == 256.0
    assert np.count_nonzero(hist[:2]) == 3
    with pytest.raises(ParameterError, match="must divide 256"):
        ColourHistogram(bins=7)


def test_parse_model():
    assert parse_model("default") == ("default", None)
    name, weights = parse_model("timm:vit_small_patch14_dinov2=/w/a=b.safetensors")
    assert name == "timm:vit_small_patch14_dinov2" and str(weights) == "/w/a=b.safetensors"
    with pytest.raises(ParameterError, match="empty"):
        parse_model("gpfm=")


def test_augment_tiles_are_seeded_and_change_the_tile_mildly():
    rng = np.random.default_rng(0)
    tiles = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    tiles[:] = (200, 120, 170)
    tiles[:, 20:40, 10:30] = (90, 40, 130)
    tiles[1] = rng.integers(0, 256, (64, 64, 3))
    first = augment_tiles(tiles, seed=3)
    assert first.shape == tiles.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, augment_tiles(tiles, seed=3))
    assert not np.array_equal(first, augment_tiles(tiles, seed=4))
    assert not np.array_equal(first[0], tiles[0])
    # a stain-like colour shift, not a different image: mean colour within ~25 levels
    assert np.abs(first[0].mean((0, 1)) - tiles[0].mean((0, 1))).max() < 25
    # the dark square is still there, somewhere, after flips and the small rotation
    assert (first[0].sum(-1) < 350).mean() > 0.03


def test_augment_components_switch_off_and_keep_their_draws():
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    colour_off = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    nothing = AugmentParams(dihedral=False, max_rotation_deg=0.0, min_crop=1.0,
                            jpeg_quality=None, **colour_off)
    np.testing.assert_array_equal(augment_tiles(tiles, seed=5, params=nothing), tiles)
    # dihedral alone: exactly the turn and mirror the full augmentation draws first
    only = augment_tiles(tiles, seed=5, params=dataclasses.replace(nothing, dihedral=True))
    for i, tile in enumerate(tiles):
        draws = np.random.default_rng([5, i])
        turns, mirror = int(draws.integers(0, 4)), draws.random() < 0.5
        expected = np.rot90(tile, k=turns)  # PIL's rotate(90) is counter-clockwise, as rot90
        np.testing.assert_array_equal(only[i], expected[:, ::-1] if mirror else expected)
    with pytest.raises(ParameterError, match="max_rotation_deg"):
        AugmentParams(max_rotation_deg=-1)
    with pytest.raises(ParameterError, match="jpeg_quality"):
        AugmentParams(jpeg_quality=(90, 60))


# ----------------------------------------------------------------------------- splits


def test_grouped_split_holds_groups_out_and_covers_every_class():
    labels = np.repeat([0, 0, 0, 1, 1, 1, 1, 2, 2], 7)
    groups = np.repeat(np.arange(9), 7)
    split = grouped_split(labels, groups, ["a", "b", "c"], seed=0)
    sides = [set(groups[idx]) for idx in (split.train, split.val, split.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert sum(len(idx) for idx in (split.train, split.val, split.test)) == len(labels)
    for idx in (split.train, split.test):
        assert set(labels[idx]) == {0, 1, 2}
    assert {0, 1} <= set(labels[split.val])  # classes with a third group also validate
    again = grouped_split(labels, groups, ["a", "b", "c"], seed=0)
    np.testing.assert_array_equal(again.test, split.test)
    assert any(not np.array_equal(grouped_split(labels, groups, ["a", "b", "c"], seed=s).test,
                                  split.test) for s in range(1, 6))


def test_grouped_split_refuses_a_class_with_one_region():
    labels = np.array([0, 0, 1, 1, 1, 1])
    groups = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ParameterError, match="'x' have tiles in only one region"):
        grouped_split(labels, groups, ["x", "y"], seed=0)


def test_folds_test_every_group_once_and_keep_classes_in_training():
    # Class "c" has only two groups: in the fold testing one, the other must stay in training.
    labels = np.repeat([0, 0, 0, 0, 1, 1, 1, 2, 2], 5)
    groups = np.repeat(np.arange(9), 5)
    folds = grouped_folds(labels, groups, ["a", "b", "c"], n_folds=3, seed=0)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(labels)))  # every tile exactly once
    for fold in folds:
        sides = [set(groups[idx]) for idx in (fold.train, fold.val, fold.test)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert sum(map(len, (fold.train, fold.val, fold.test))) == len(labels)
        assert set(labels[fold.test]) <= set(labels[fold.train])
    assert {len(set(labels[f.test])) for f in folds} >= {2}  # classes are spread over folds
    again = grouped_folds(labels, groups, ["a", "b", "c"], n_folds=3, seed=0)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(folds, again, strict=True))


@pytest.mark.parametrize(("n_folds", "labels", "message"), [
    (2, [0, 0, 1, 1, 1, 1], "at least 3 folds"),
    (4, [0, 0, 1, 1, 1, 1], "only 3 regions; use at most 3 folds"),
    (3, [0, 0, 1, 1, 1, 1], "'x' have tiles in only one region"),
])
def test_folds_refuse_what_cannot_be_cross_validated(n_folds, labels, message):
    groups = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ParameterError, match=message):
        grouped_folds(np.array(labels), groups, ["x", "y"], n_folds=n_folds)


def test_protocols_over_folds_measure_every_tile(separable, random_features):
    features, labels, groups, names = _grouped_data(np.random.default_rng(0), spread=8.0)
    folds = grouped_folds(labels, groups, names, n_folds=5, seed=0)
    for result in (linear_probe(features, labels, folds, 4, n_boot=50, epochs=150),
                   knn_probe(features, labels, folds, 4, n_boot=50),
                   retrieval(features, labels, folds, 4, n_boot=50)):
        assert result.n_eval == len(labels)
        key = "top1" if result.protocol == "retrieval" else "balanced_accuracy"
        assert result.metrics[key].value > 0.97, result.protocol
    assert linear_probe(features, labels, folds, 4, n_boot=0, epochs=150).params["folds"] == 5
    # One fold given as a list is the single split.
    features, labels, split = random_features
    single, listed = knn_probe(features, labels, split, 4), knn_probe(features, labels, [split], 4)
    assert single.metrics["balanced_accuracy"] == listed.metrics["balanced_accuracy"]


def test_folds_of_the_sample_regions(sample_tiles):
    folds = make_folds(sample_tiles, 3)
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(
        range(len(sample_tiles)))
    for fold in folds:  # every class with a test tile is also learnt from
        assert set(sample_tiles.labels[fold.test]) <= set(sample_tiles.labels[fold.train])


def test_band_groups_follow_tile_rows_per_slide():
    centres = np.array([[0, 0], [5, 10], [0, 49], [0, 50], [0, 99], [0, 0], [0, 99]], float)
    sources = np.array([0, 0, 0, 0, 0, 1, 1])
    groups = band_groups(centres, sources, n_bands=2)
    assert groups[0] == groups[1] == groups[2] != groups[3] == groups[4]
    assert groups[5] not in groups[:5] and groups[6] not in groups[:6]
    with pytest.raises(ParameterError, match="need tile positions|needs tile positions"):
        band_groups(np.full((2, 2), np.nan), np.zeros(2, int))


# ----------------------------------------------------------------------------- tile sets


@pytest.fixture(scope="module")
def sample_tiles(sample_slide_path):
    return tiles_from_regions(sample_slide_path, REGIONS, mpp=1.0, size=112)


def test_labelled_regions_of_the_sample(sample_tiles):
    annotations = read_geojson(REGIONS)
    assert {a.class_name for a in annotations} == {"background", "dermis", "epidermis", "keratin"}
    ts = sample_tiles
    assert ts.images.shape == (44, 112, 112, 3) and ts.mpp == 1.0
    assert ts.class_counts() == {"background": 22, "dermis": 14, "epidermis": 6, "keratin": 2}
    assert ts.groups_per_class() == {"background": 5, "dermis": 4, "epidermis": 3, "keratin": 2}
    for i in range(len(ts)):  # each tile's centre lies in the polygon it is grouped with
        region = next(a for a in annotations if a.name == ts.group_names[ts.groups[i]])
        assert region.class_name == ts.class_names[ts.labels[i]]
        assert points_in_polygon(ts.centres[i : i + 1], region.polygon)[0]
    # the labels say what the pixels show: glass is white, epidermis darker than dermis
    brightness = ts.images.reshape(len(ts), -1).mean(1)
    by_class = {name: brightness[ts.labels == i].mean() for i, name in enumerate(ts.class_names)}
    assert brightness[ts.labels == 0].min() > 225
    assert by_class["epidermis"] < by_class["dermis"] - 15
    # every region split of it holds out whole regions with every class in train and test
    split = make_split(ts, "region", seed=0)
    for idx in (split.train, split.test):
        assert set(ts.labels[idx]) == set(range(4))


def test_regions_with_a_stride_give_overlapping_tiles(sample_slide_path):
    ts = tiles_from_regions(sample_slide_path, REGIONS, mpp=2.0, size=56, stride=28)
    assert ts.class_counts() == {"background": 88, "dermis": 46, "epidermis": 20, "keratin": 9}
    centres = ts.centres[ts.labels == ts.class_names.index("dermis")]
    steps = np.diff(np.unique(centres[:, 0]))
    assert steps.min() == pytest.approx(28 * 2.0 / 0.499, rel=1e-3)


def test_regions_errors(tmp_path, sample_slide_path):
    square = [[100, 100], [700, 100], [700, 700], [100, 700]]
    plain = tmp_path / "plain.geojson"
    write_geojson(plain, shapes_to_geojson([np.array(square)]))
    with pytest.raises(ParameterError, match="no region with a classification name"):
        tiles_from_regions(sample_slide_path, plain, mpp=1.0, size=112)
    single = tmp_path / "single.geojson"
    write_geojson(single, shapes_to_geojson([np.array(square)], classes=["background"]))
    with pytest.raises(ParameterError, match="one class only"):
        tiles_from_regions(sample_slide_path, single, mpp=1.0, size=112)
    tiny = tmp_path / "tiny.geojson"
    write_geojson(tiny, shapes_to_geojson([(10, 10, 20, 20), (40, 10, 20, 20)],
                                          classes=["a", "b"]))
    with pytest.raises(ParameterError, match="hold no tile centre"):
        tiles_from_regions(sample_slide_path, tiny, mpp=1.0, size=112)
    with pytest.raises(ParameterError, match="finer than"):
        tiles_from_regions(sample_slide_path, REGIONS, mpp=0.25, size=112)
    with pytest.raises(ParameterError, match="--regions"):
        load_tileset(sample_slide_path)


def test_tiles_from_csv_centre_on_boxes(tmp_path, sample_slide_path):
    from napari_gpfm.slides import open_slide

    link = tmp_path / "slides"
    link.mkdir()
    (link / "s.svs").symlink_to(sample_slide_path)
    table = tmp_path / "boxes.csv"
    table.write_text(
        "slide,x,y,w,h,label,group\n"
        "slides/s.svs,1000,2500,300,300,dermis,bottom\n"
        "slides/s.svs,1100,2600,100,100,dermis,bottom\n"
        "slides/s.svs,200,400,224,224,background,\n"
    )
    ts = tiles_from_csv(table, mpp=1.0, size=64)
    assert ts.class_names == ("background", "dermis") and len(ts) == 3
    assert ts.groups[0] == ts.groups[1] != ts.groups[2]
    np.testing.assert_allclose(ts.centres[0], [1150, 2650])
    side = 64 * 1.0 / 0.499
    with open_slide(sample_slide_path) as slide:
        expected = slide.read_region_mpp((int(round(1150 - side / 2)), int(round(2650 - side / 2))),
                                         64, 1.0)
    np.testing.assert_array_equal(ts.images[0], expected)
    np.testing.assert_array_equal(ts.images[0], ts.images[1])  # same centre, same tile
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,x,y,label\ns.svs,1,2,a\n")
    with pytest.raises(ParameterError, match="missing column"):
        tiles_from_csv(bad)
    bad.write_text("slide,x,y,w,h,label\nslides/s.svs,1,two,3,4,a\n")
    with pytest.raises(ParameterError, match="line 2: x, y, w, h must be numbers"):
        tiles_from_csv(bad)


def test_tiles_from_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, count in (("tumour", 3), ("stroma", 2)):
        for i in range(count):
            folder = tmp_path / cls / ("patient1" if i < 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
                folder / f"t{i}.png")
    (tmp_path / "stroma" / "notes.txt").write_text("not an image")
    ts = tiles_from_imagefolder(tmp_path, size=32)
    assert ts.images.shape == (5, 32, 32, 3)
    assert ts.class_counts() == {"stroma": 2, "tumour": 3}
    names = [ts.group_names[g] for g in ts.groups]
    assert names.count("tumour/patient1") == 2 and "tumour/t2.png" in names
    assert np.isnan(ts.centres).all()
    with pytest.raises(ParameterError, match="needs tile positions|need tile positions"):
        make_split(ts, "band")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "tumour" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ParameterError, match="cannot read image .*broken.png"):
        tiles_from_imagefolder(tmp_path, size=32)


# ----------------------------------------------------------------------------- report


def test_report_markdown_and_csv(tmp_path, separable):
    features, labels, split = separable
    report = EvaluationReport("synthetic: 240 tiles", {"a": 60, "b": 60}, "split by region",
                              seed=0, n_boot=10)
    report.add("enc-a", "enc-a@123", knn_probe(features, labels, split, 4, n_boot=10))
    report.add("enc-a", "enc-a@123", retrieval(features, labels, split, 4, n_boot=10))
    md = report.write_markdown(tmp_path / "r.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| enc-a")]
    assert len(table) == 2 and "| knn |" in table[0] and "| retrieval |" in table[1]
    assert "n/a" in table[1]  # top-5 with 4 classes
    rows = list(csv.DictReader(io.StringIO(report.write_csv(tmp_path / "r.csv").read_text())))
    assert [r["protocol"] for r in rows] == ["knn", "retrieval"]
    assert float(rows[0]["accuracy_low"]) <= float(rows[0]["accuracy"]) <= 1.0
    assert rows[1]["accuracy"] == "" and rows[1]["top5"] == ""
    assert json.loads(rows[0]["params"])["k"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.md"]  # no temp file left
    with pytest.raises(ParameterError, match="does not exist"):
        report.write_csv(tmp_path / "missing" / "r.csv")
    assert str(Estimate(0.5, 0.25, 0.75)) == "0.500 [0.250, 0.750]"


def test_importing_evaluation_does_not_import_torch():
    code = ("import sys, napari_gpfm.evaluation as e, napari_gpfm.evaluation.tilesets, "
            "napari_gpfm.cli.eval; e.PROTOCOLS; assert 'torch' not in sys.modules, 'torch'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
