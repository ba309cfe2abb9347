"""`gpfm heatmap` on the sample embedded with the default model, and on a slide without tissue."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from slide_factory import write_pyramid

from napari_gpfm.cli import main
from napari_gpfm.embedding.store import EmbeddingStore


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, sample_slide_path):
    out = tmp_path_factory.mktemp("emb")
    assert main(["embed", str(sample_slide_path), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    return next(out.rglob("*.zarr"))


def test_pca_clusters_and_similarity_maps_with_their_tables(sample_store, tmp_path, capsys):
    store = EmbeddingStore.open(sample_store)
    width, height = store.attrs["slide_dimensions"]
    for kind, extra in (("pca", []), ("clusters", ["--k", "3"]),
                        ("similarity", ["--roi", "1100,600,300,300", "--top-k", "5"])):
        png, table = tmp_path / f"{kind}.png", tmp_path / f"{kind}.json"
        assert main(["heatmap", str(sample_store), "--kind", kind, *extra, "--out", str(png),
                     "--table", str(table)]) == 0
        assert f"wrote {kind} map of {store.n_done} tiles" in capsys.readouterr().out
        image = np.asarray(Image.open(png))
        # Drawn over the slide's thumbnail: the slide's aspect ratio, and not one flat colour.
        assert abs(image.shape[1] / image.shape[0] - width / height) < 0.02
        assert image[..., :3].std() > 10
        rows = json.loads(table.read_text())
        if kind == "clusters":
            assert len(rows) == 3 and sum(r["tiles"] for r in rows) == store.n_done
        if kind == "similarity":
            assert len(rows) == 5
            scores = [r["score"] for r in rows]
            assert scores == sorted(scores, reverse=True)


def test_a_store_of_a_slide_without_tissue_says_so(tmp_path, capsys):
    blank = write_pyramid(tmp_path / "glass.tif", np.full((1024, 1024, 3), 245, np.uint8),
                          levels=1, mpp=0.5)
    assert main(["embed", str(blank), "--out", str(tmp_path / "emb"), "--device", "cpu",
                 "--quiet"]) == 0
    assert "no tile has enough tissue" in capsys.readouterr().out
    store = next((tmp_path / "emb").rglob("*.zarr"))
    assert main(["heatmap", str(store), "--out", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    # Not "run gpfm embed first": it was run, and found nothing to embed.
    assert "holds no tiles: its slide had no tissue tile" in err and "run `gpfm embed`" not in err
    assert not (tmp_path / "m.png").exists()


def test_a_similarity_roi_outside_the_slide_is_named(sample_store, tmp_path, capsys):
    # It used to read "the ROI contains no embedded tile; draw it over tissue".
    out = tmp_path / "s.png"
    assert main(["heatmap", str(sample_store), "--kind", "similarity", "--roi", "5000,10,50,50",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--roi 5000,10,50,50 lies outside the 2220 x 2967 px slide" in err and not out.exists()
