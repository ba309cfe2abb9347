"""`gpfm demo`, the README's main job, end to end on the embedded default model (offline)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from napari_gpfm.cli import main


def test_demo_writes_maps_and_report_with_the_embedded_model(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    for name in ("tiles_preview.png", "pca_map.png", "cluster_map.png", "similarity_map.png",
                 "similarity_map.tif", "tiles.csv", "report.md", "similar_tiles.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "default@" in report and "tissue tiles" in report
    similar = json.loads((out / "similar_tiles.json").read_text())
    assert len(similar) == 10
    scores = [row["score"] for row in similar]
    assert scores == sorted(scores, reverse=True)
    # the maps are drawn over the slide thumbnail: same aspect as the 2220 x 2967 slide
    pca = np.asarray(Image.open(out / "pca_map.png"))
    assert abs(pca.shape[1] / pca.shape[0] - 2220 / 2967) < 0.01
    # a second run reuses the store: nothing is embedded again
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    assert "| embedded this run | 0 tiles" in (out / "report.md").read_text()


def test_demo_on_another_slide_queries_its_tissue_and_fits_k_to_its_tiles(tmp_path, capsys):
    from pathlib import Path

    crop = (Path(__file__).parents[1] / "data" / "extra-he" / "openslide_os1_crop"
            / "OS-1-detail.ome.tif")
    out = tmp_path / "demo"
    # 4 tissue tiles: the sample's default query box and k=5 would not fit this slide.
    assert main(["demo", "--out", str(out), "--device", "cpu", "--slide", str(crop)]) == 0
    report = (out / "report.md").read_text()
    assert "| tissue tiles | 4 |" in report
    assert "(k = 4, lowered from --k 5 to the tile count)" in report
    assert "--k 5 is more than the 4 tissue tiles: k = 4" in capsys.readouterr().out
    similar = json.loads((out / "similar_tiles.json").read_text())
    assert len(similar) == 3  # every tile but the query
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--k", "1"]) == 2
    assert "--k 1" in capsys.readouterr().err
    # Refused runs leave no folder behind: a query off the slide is refused before embedding.
    assert main(["demo", "--out", str(tmp_path / "off"), "--device", "cpu", "--slide",
                 str(crop), "--roi", "99999,99999,5,5"]) == 2
    assert "lies outside OS-1-detail.ome.tif" in capsys.readouterr().err
    assert not (tmp_path / "off").exists()
    text = tmp_path / "notes.txt"
    text.write_text("")
    assert main(["demo", "--out", str(text), "--device", "cpu"]) == 2
    assert "is a file; name a folder" in capsys.readouterr().err
