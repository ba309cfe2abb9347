"""`gpfm eval`: encoders compared on the labelled regions of the real sample slide."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import REPO_ROOT

from napari_gpfm.cli import main

REGIONS = REPO_ROOT / "data" / "labels" / "cmu1_regions.geojson"
ARCH = "test_vit"  # timm's tiny ViT: 160 px input, 64-d embedding
FAST = ["--mpp", "1.0", "--size", "112", "--bootstrap", "50", "--epochs", "300", "--quiet"]
PROTOCOLS = ("linear", "knn", "retrieval", "augretrieval")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights for the tiny ViT, written here: nothing is downloaded."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _eval(*argv) -> int:
    return main(["eval", *map(str, argv)])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory, weights, sample_slide_path):
    out = tmp_path_factory.mktemp("report")
    rc = _eval("all", "--tiles", sample_slide_path, "--regions", REGIONS,
               "--models", f"timm:{ARCH}={weights}", "--baseline", "colour-histogram",
               "--out", out / "report.md", "--csv", out / "report.csv", *FAST)
    assert rc == 0
    return out


def test_eval_writes_one_row_per_encoder_and_protocol(report):
    rows = list(csv.DictReader((report / "report.csv").open()))
    pairs = [(r["encoder"], r["protocol"]) for r in rows]
    encoders = (f"timm:{ARCH}", "baseline:colour-histogram")
    assert pairs == [(e, p) for e in encoders for p in PROTOCOLS]
    assert rows[0]["encoder_id"].startswith(f"timm:{ARCH}@")
    for row in rows:
        for key, value in row.items():
            if value and key.split("_")[0] in ("accuracy", "balanced", "f1", "auroc", "top1",
                                               "top3", "mrr", "class"):
                assert 0.0 <= float(value) <= 1.0, (row["protocol"], key, value)
    by = {(r["encoder"], r["protocol"]): r for r in rows}
    # 44 labelled tiles: supervised protocols see a region split of them, augretrieval all
    linear = by[(f"timm:{ARCH}", "linear")]
    assert int(linear["n_fit"]) + int(linear["n_val"]) + int(linear["n_eval"]) == 44
    assert int(by[("baseline:colour-histogram", "augretrieval")]["n_eval"]) == 44
    # colour alone tells glass, collagen and epithelium apart: well above chance (0.25, 0.5)
    knn = by[("baseline:colour-histogram", "knn")]
    assert float(knn["balanced_accuracy"]) > 0.4 and float(knn["auroc_macro"]) > 0.75
    assert json.loads(linear["params"])["max_epochs"] == 300
    md = (report / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 8  # header + encoders x protocols
    assert "cmu1_regions.geojson" in md and "split by region" in md
    assert "background 22, dermis 14, epidermis 6, keratin 2" in md


def test_eval_is_reproducible_and_prints_the_table(report, weights, sample_slide_path, capsys,
                                                    tmp_path):
    rc = _eval("knn", "retrieval", "--tiles", sample_slide_path, "--regions", REGIONS,
               "--baseline", "colour-histogram", "--csv", tmp_path / "again.csv", *FAST)
    assert rc == 0
    out = capsys.readouterr().out
    assert "| baseline:colour-histogram | knn |" in out
    first = {(r["encoder"], r["protocol"]): r for r in csv.DictReader(
        (report / "report.csv").open())}
    for row in csv.DictReader((tmp_path / "again.csv").open()):
        before = first[(row["encoder"], row["protocol"])]
        assert row["top1"] == before["top1"] and row["accuracy"] == before["accuracy"]


def test_eval_band_split(sample_slide_path, tmp_path):
    rc = _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS, "--split", "band",
               "--baseline", "colour-histogram", "--out", tmp_path / "b.md",
               "--csv", tmp_path / "b.csv", *FAST)
    assert rc == 0
    (row,) = csv.DictReader((tmp_path / "b.csv").open())
    assert int(row["n_fit"]) + int(row["n_eval"]) == 44
    assert "split by band (5 groups, seed 0)" in (tmp_path / "b.md").read_text()


def test_eval_cross_validation_tests_every_tile(sample_slide_path, tmp_path):
    rc = _eval("knn", "retrieval", "--tiles", sample_slide_path, "--regions", REGIONS,
               "--folds", 3, "--baseline", "colour-histogram", "--out", tmp_path / "cv.md",
               "--csv", tmp_path / "cv.csv", *FAST)
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "cv.csv").open()))
    assert {r["protocol"] for r in rows} == {"knn", "retrieval"}
    assert all(int(r["n_eval"]) == 44 for r in rows)  # every labelled tile, once
    assert "3-fold cross-validation by region" in (tmp_path / "cv.md").read_text()


def test_eval_on_an_image_folder(tmp_path, weights):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, colour in (("pink", (230, 130, 170)), ("purple", (110, 50, 140))):
        for i in range(4):
            folder = tmp_path / "tiles" / cls / f"region{i}"
            folder.mkdir(parents=True)
            for j in range(3):
                noise = rng.integers(-20, 21, (48, 48, 3))
                Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
                    folder / f"{j}.png")
    rc = _eval("knn", "augretrieval", "--tiles", tmp_path / "tiles", "--size", "32",
               "--models", f"timm:{ARCH}={weights}", "--csv", tmp_path / "r.csv",
               "--bootstrap", "20", "--quiet")
    assert rc == 0
    rows = {r["protocol"]: r for r in csv.DictReader((tmp_path / "r.csv").open())}
    assert float(rows["knn"]["accuracy"]) == 1.0  # flat colours: any encoder tells them apart
    assert int(rows["augretrieval"]["n_eval"]) == 24


def test_unknown_model_is_one_line(sample_slide_path, capsys):
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS,
                 "--models", "not-a-model", *FAST) == 2
    assert "no encoder named 'not-a-model'" in _error_line(capsys)
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS,
                 "--models", "timm:not_a_real_net", *FAST) == 2
    assert "timm has no architecture 'not_a_real_net'" in _error_line(capsys)
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS,
                 "--models", "baseline:texture", *FAST) == 2
    assert "no baseline named" in _error_line(capsys)


def test_missing_weights_file_is_one_line(sample_slide_path, tmp_path, capsys):
    missing = tmp_path / "nothing.safetensors"
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS,
                 "--models", f"timm:{ARCH}={missing}", *FAST) == 2
    assert "nothing.safetensors" in _error_line(capsys)


def test_default_model_before_it_is_built(sample_slide_path, capsys, tmp_path, monkeypatch):
    from napari_gpfm.encoders import default_model

    # a checkout whose embedded model has not been built (its weights folder is empty)
    monkeypatch.setattr(default_model, "PACKAGE_WEIGHTS_DIR", tmp_path)
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS,
                 "--models", "default", *FAST) == 2
    assert "default model is not built yet" in _error_line(capsys)


def test_regions_without_labels_is_one_line(sample_slide_path, tmp_path, capsys):
    from napari_gpfm.analysis.geojson import shapes_to_geojson, write_geojson

    unlabelled = tmp_path / "unlabelled.geojson"
    write_geojson(unlabelled, shapes_to_geojson([(100, 100, 600, 600)]))
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", unlabelled,
                 "--baseline", "colour-histogram", *FAST) == 2
    assert "no region with a classification name" in _error_line(capsys)


def test_one_class_only_is_one_line(sample_slide_path, tmp_path, capsys):
    from napari_gpfm.analysis.geojson import shapes_to_geojson, write_geojson

    one = tmp_path / "one.geojson"
    write_geojson(one, shapes_to_geojson([(100, 100, 600, 600), (100, 1300, 500, 500)],
                                         classes=["background", "background"]))
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", one,
                 "--baseline", "colour-histogram", *FAST) == 2
    assert "one class only ('background')" in _error_line(capsys)


def test_class_in_one_region_only_is_one_line(sample_slide_path, tmp_path, capsys):
    from napari_gpfm.analysis.geojson import shapes_to_geojson, write_geojson

    two = tmp_path / "two.geojson"
    write_geojson(two, shapes_to_geojson([(100, 100, 600, 600), (100, 1300, 500, 500),
                                          (900, 2430, 400, 400)],
                                         classes=["background", "background", "dermis"]))
    assert _eval("linear", "--tiles", sample_slide_path, "--regions", two,
                 "--baseline", "colour-histogram", *FAST) == 2
    line = _error_line(capsys)
    assert "'dermis' have tiles in only one region" in line and "--split band" in line


def test_other_bad_input_is_one_line(sample_slide_path, tmp_path, capsys):
    assert _eval("knn", "--tiles", sample_slide_path, "--baseline", "colour-histogram",
                 *FAST) == 2
    assert "--regions" in _error_line(capsys)
    assert _eval("knn", "--tiles", tmp_path / "nowhere", "--baseline", "colour-histogram",
                 *FAST) == 2
    assert "no such file or folder" in _error_line(capsys)
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS, *FAST) == 2
    assert "no encoder to evaluate" in _error_line(capsys)
    assert _eval("knn", "--tiles", sample_slide_path, "--regions", REGIONS,
                 "--baseline", "colour-histogram", "--out", tmp_path / "no" / "r.md", *FAST) == 2
    assert "does not exist" in _error_line(capsys)


def test_augretrieval_alone_needs_no_split(sample_slide_path, tmp_path):
    from napari_gpfm.analysis.geojson import shapes_to_geojson, write_geojson

    two = tmp_path / "two.geojson"
    write_geojson(two, shapes_to_geojson([(100, 100, 600, 600), (900, 2430, 400, 400)],
                                         classes=["background", "dermis"]))
    assert _eval("augretrieval", "--tiles", sample_slide_path, "--regions", two,
                 "--baseline", "colour-histogram", "--csv", tmp_path / "a.csv", *FAST) == 0
    (row,) = csv.DictReader((tmp_path / "a.csv").open())
    assert row["protocol"] == "augretrieval" and int(row["n_eval"]) == int(row["n_fit"]) > 4
    assert float(row["mrr_low"]) <= float(row["mrr"]) <= float(row["mrr_high"])
