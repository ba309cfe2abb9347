"""Linear probe: training, cross-validation, safe save/load, ROI labels and area tables."""

from __future__ import annotations

import numpy as np
import pytest

from napari_gpfm.analysis.classify import (
    LinearProbe,
    area_table,
    labels_from_rois,
    left_out_note,
)
from napari_gpfm.analysis.geometry import Roi
from napari_gpfm.errors import GPFMError, ParameterError, StoreError

CLASSES = ["tumour", "stroma", "fat"]


def blobs(sizes=(40, 30, 10), dim=64, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim)) * 3.0
    feats = np.vstack(
        [c + spread * rng.standard_normal((n, dim)) for c, n in zip(centres, sizes, strict=True)]
    )
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return feats, labels, centres


@pytest.fixture(scope="module")
def trained():
    feats, labels, centres = blobs()
    names = [CLASSES[i] for i in labels]
    probe = LinearProbe(encoder_id="gpfm-vitl14@abc123", tiling_id="t-0.5-224")
    probe.fit(feats, names, CLASSES, seed=0)
    return probe, feats, labels, centres


def test_probe_learns_separable_imbalanced_classes(trained):
    probe, feats, labels, centres = trained
    assert probe.cv.folds == 5  # min(5, smallest class = 10)
    assert probe.cv.accuracy >= 0.95 and probe.cv.balanced_accuracy >= 0.95
    assert probe.cv.reason is None
    assert probe.train_counts == {"tumour": 40, "stroma": 30, "fat": 10}
    rng = np.random.default_rng(9)
    test_labels = rng.integers(0, 3, 300)
    test = centres[test_labels] + rng.standard_normal((300, 64))
    assert np.mean(probe.predict(test) == test_labels) >= 0.95
    proba = probe.predict_proba(test)
    assert proba.shape == (300, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_cross_validation_is_honest_on_random_labels():
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((90, 64))
    labels = rng.integers(0, 3, 90)
    probe = LinearProbe().fit(feats, labels, CLASSES)
    assert probe.cv.balanced_accuracy < 0.6  # chance is 1/3; training accuracy would be ~1


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probabilities_match_scikit_learn(n_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, labels, _ = blobs(sizes=(25, 20, 15)[:n_classes], spread=3.0, seed=n_classes)
    probe = LinearProbe().fit(feats, labels, CLASSES[:n_classes], seed=0)
    reference = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=2000, random_state=0),
    ).fit(feats, labels)
    np.testing.assert_allclose(
        probe.predict_proba(feats), reference.predict_proba(feats), rtol=1e-6, atol=1e-9
    )


def test_single_sample_class_skips_cross_validation_with_a_reason():
    feats, labels, _ = blobs(sizes=(10, 1))
    probe = LinearProbe().fit(feats, labels, ["a", "b"])
    assert probe.cv.accuracy is None and probe.cv.folds is None
    assert "'b' has only 1 labelled tile" in probe.cv.reason
    assert probe.predict(feats[:1]).tolist() == [0]


def test_save_load_gives_identical_probabilities(trained, tmp_path):
    probe, feats, _, _ = trained
    path = probe.save(tmp_path / "probe.npz")
    with np.load(path, allow_pickle=False) as npz:  # plain arrays only, no pickle inside
        assert "metadata" in npz.files
    loaded = LinearProbe.load(path, expected_encoder_id="gpfm-vitl14@abc123")
    np.testing.assert_array_equal(loaded.predict_proba(feats), probe.predict_proba(feats))
    assert loaded.class_names == CLASSES
    np.testing.assert_array_equal(loaded.colours, probe.colours)
    assert loaded.cv == probe.cv
    assert loaded.encoder_id == "gpfm-vitl14@abc123" and loaded.tiling_id == "t-0.5-224"
    assert not list(tmp_path.glob(".*.tmp"))


def test_probe_for_another_encoder_or_tiling_is_refused(trained, tmp_path):
    probe, _, _, _ = trained
    path = probe.save(tmp_path / "probe.npz")
    with pytest.raises(StoreError) as err:
        LinearProbe.load(path, expected_encoder_id="uni2-h@def456")
    message = str(err.value)
    assert "gpfm-vitl14@abc123" in message and "uni2-h@def456" in message and "\n" not in message
    with pytest.raises(StoreError, match="tiling"):
        LinearProbe.load(path, expected_tiling_id="t-1.0-224")
    assert LinearProbe.load(path).is_fitted


def test_unreadable_and_unsafe_probe_files_are_refused(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        LinearProbe.load(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(StoreError) as info:  # not a zip: no talk of pickles, which it has none
        LinearProbe.load(tmp_path / "text.npz")
    assert "is not a napari-gpfm probe" in str(info.value) and "pickle" not in str(info.value)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(StoreError, match="missing"):
        LinearProbe.load(tmp_path / "other.npz")
    # An object array needs pickle to load; it must be refused, never unpickled.
    arrays = {k: np.zeros(2) for k in ("coef", "intercept", "scaler_mean", "scaler_scale")}
    np.savez(
        tmp_path / "pickled.npz",
        colours=np.zeros((2, 3), np.uint8),
        metadata=np.array([{"format": "napari-gpfm/linear-probe"}], dtype=object),
        **arrays,
    )
    with pytest.raises(StoreError) as info:
        LinearProbe.load(tmp_path / "pickled.npz")
    assert "pickled objects" in str(info.value) and "allow_pickle" not in str(info.value)


def test_fit_and_predict_parameter_errors(trained):
    probe, _, _, _ = trained
    feats, labels, _ = blobs()
    with pytest.raises(ParameterError, match="'necrosis' is not one of the classes"):
        LinearProbe().fit(feats[:2], ["tumour", "necrosis"], CLASSES)
    with pytest.raises(ParameterError, match="class 'fat' has no labelled tiles"):
        LinearProbe().fit(feats[:20], ["tumour"] * 10 + ["stroma"] * 10, CLASSES)
    with pytest.raises(ParameterError, match="at least 2 classes"):
        LinearProbe().fit(feats[:5], ["tumour"] * 5)
    with pytest.raises(ParameterError, match="one per tile"):
        LinearProbe().fit(feats[:5], labels[:4], CLASSES)
    with pytest.raises(ParameterError, match=r"shape \(N, 64\)"):
        probe.predict_proba(np.zeros((2, 32)))
    with pytest.raises(ParameterError, match="not trained"):
        LinearProbe().predict(feats)
    assert issubclass(ParameterError, GPFMError)


def test_class_names_are_inferred_from_string_labels():
    feats, labels, _ = blobs(sizes=(8, 8))
    probe = LinearProbe().fit(feats, np.where(labels == 0, "zeta", "alpha"))
    assert probe.class_names == ["alpha", "zeta"]
    assert probe.predict(feats[:8]).tolist() == [1] * 8


def test_labels_from_rois_the_smallest_region_decides_and_ties_are_dropped():
    ys, xs = np.mgrid[0:4, 0:6]
    coords = np.column_stack([xs.ravel() * 100, ys.ravel() * 100])  # index = row * 6 + col
    rois = [
        (Roi.rectangle(0, 0, 300, 200), "tumour"),  # cols 0-2, rows 0-1
        (Roi.rectangle(200, 0, 200, 200), "stroma"),  # cols 2-3, rows 0-1: smaller, takes col 2
        ((0, 100, 100, 300), "tumour"),  # col 0, rows 1-3: overlaps tumour only
        ((550, 350), "fat"),  # point: the last tile
        (Roi.rectangle(100, 200, 100, 100), "necrosis"),  # tile 13 ...
        (Roi.rectangle(100, 200, 100, 100), "tumour"),  # ... labelled twice: ambiguous, dropped
        (Roi.rectangle(0, 0, 600, 400), "tissue"),  # the whole grid, drawn last and largest
    ]
    idx, labels = labels_from_rois(coords, 100, rois)
    expected = {0: "tumour", 1: "tumour", 6: "tumour", 7: "tumour", 12: "tumour", 18: "tumour"}
    expected.update({2: "stroma", 3: "stroma", 8: "stroma", 9: "stroma", 23: "fat"})
    expected.update({i: "tissue" for i in range(24) if i not in expected and i != 13})
    assert idx.tolist() == sorted(expected)
    assert labels.tolist() == [expected[i] for i in sorted(expected)]
    empty_idx, empty_labels = labels_from_rois(coords, 100, [((5000, 5000, 10, 10), "x")])
    assert empty_idx.size == 0 and empty_labels.size == 0

    # Why a class got nothing: its regions hold no tile, or smaller regions took them all.
    rois.append(((5000, 5000, 10, 10), "glass"))
    note = left_out_note(["glass", "necrosis"], [(rois, coords, 100)])
    assert "left out 'glass': no embedded tile" in note
    assert "left out 'necrosis': every tile of those regions lies in a smaller region" in note


def test_area_table():
    rows = area_table(
        np.array([0, 2, 2, 2]), CLASSES, 0.05, colours=["#ff0000", "#00ff00", "#0000ff"]
    )
    assert [r["class"] for r in rows] == CLASSES
    assert [r["tiles"] for r in rows] == [1, 0, 3]
    assert rows[2]["area_mm2"] == pytest.approx(0.15) and rows[2]["fraction"] == 0.75
    assert rows[0]["colour"] == "#ff0000"
    with pytest.raises(ParameterError):
        area_table(np.array([3]), CLASSES, 0.05)


def test_cli_train_and_predict_on_the_sample_name_what_they_leave_out(
        tmp_path, sample_slide_path, capsys):
    from pathlib import Path

    from napari_gpfm.cli import main

    regions = Path(__file__).parents[1] / "data" / "labels" / "cmu1_regions.geojson"
    assert main(["embed", str(sample_slide_path), "--out", str(tmp_path / "emb"),
                 "--device", "cpu"]) == 0
    store = str(next((tmp_path / "emb").rglob("*.zarr")))
    capsys.readouterr()
    assert main(["classify", "train", store, str(regions), "--out",
                 str(tmp_path / "p.npz")]) == 0
    out = capsys.readouterr().out
    # The store holds tissue tiles only, so the background regions teach nothing: say so.
    assert "3-class probe" in out and "left out 'background': no embedded tile" in out
    # A map name it cannot write is refused before anything is written, under its own flag.
    assert main(["classify", "predict", store, "--probe", str(tmp_path / "p.npz"), "--out",
                 str(tmp_path / "pred.geojson"), "--map", str(tmp_path / "map.jpg")]) == 2
    assert "--map " in capsys.readouterr().err and not (tmp_path / "pred.geojson").exists()
    assert main(["classify", "predict", store, "--probe", str(tmp_path / "p.npz"), "--out",
                 str(tmp_path / "pred.geojson"), "--map", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "pred.geojson").stat().st_size > 0 and (tmp_path / "map.png").is_file()
