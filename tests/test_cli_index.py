"""`gpfm index build|add|remove|info|search`: round trips through the CLI on real stores, an
image query embedded by a real (tiny, random-weight) encoder, and the one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from napari_gpfm.cli import main
from napari_gpfm.embedding.engine import embed_slide, prepare_store
from napari_gpfm.embedding.store import EmbeddingStore
from napari_gpfm.encoders import load_encoder
from napari_gpfm.library import ClusteredEmbeddings, LibraryIndex
from napari_gpfm.slides import open_slide
from napari_gpfm.slides.synthetic import write_synthetic_slide
from napari_gpfm.tiling import TileLoader, TilingSpec, make_grid

D = 32
SPEC = TilingSpec(mpp=0.5, read_size=32, model_size=32, min_tissue=0.0)
ARCH = "test_vit"  # a real timm ViT (patch 16, 160 px, 64-d), small enough for CPU tests


def gpfm(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def stores_dir(tmp_path_factory):
    """A folder holding three stores of synthetic slides, with structured features."""
    root = tmp_path_factory.mktemp("cli-index")
    gen = ClusteredEmbeddings(D, n_clusters=20, seed=3)
    meta = {"encoder_id": "timm:x@ababababab", "encoder_name": "timm:x",
            "weights_sha256": "ab" * 32, "embed_dim": D}
    folder = root / "stores"
    for i in range(3):
        slide_path = write_synthetic_slide(root / f"slide{i}.tif", 512, 512, mpp=0.5, seed=i)
        with open_slide(slide_path) as slide:
            grid = make_grid(slide, SPEC)
            store = EmbeddingStore.create(folder / f"slide{i}" / "x.zarr", slide=slide,
                                          grid=grid, encoder_meta=meta)
            store.write(np.arange(store.n_tiles), gen.chunk(i * 256, i * 256 + store.n_tiles))
            store.finalize()
    return folder


def test_build_info_search_remove_add(tmp_path, capsys, stores_dir):
    lib = tmp_path / "lib"
    code, out, err = gpfm(capsys, "index", "build", stores_dir, "--out", lib)
    assert code == 0, err
    assert out.startswith(f"built {lib}: 3 slides, 768 tiles, flat (exact IndexFlatIP)")
    assert "copying 3/3" in err  # progress on stderr

    code, out, _ = gpfm(capsys, "index", "info", lib)
    assert code == 0
    assert "size       3 slides, 768 tiles" in out
    assert out.count(" ok ") == 3
    code, out, _ = gpfm(capsys, "index", "info", lib, "--json")
    info = json.loads(out)
    assert info["n_vectors"] == 768 and info["kind"] == "flat" and info["embed_dim"] == D

    store = stores_dir / "slide1" / "x.zarr"
    roi = (64, 96, 96, 64)
    code, out, err = gpfm(capsys, "index", "search", lib, "--store", store, "--roi",
                          ",".join(map(str, roi)), "--top-k", 7, "--json")
    assert code == 0, err
    doc = json.loads(out)
    want = LibraryIndex.open(lib).search_roi(store, roi, top_k=7)
    assert [(h["slide_fingerprint"], h["tile"]) for h in doc["hits"]] == [
        (h.slide_fingerprint, h.tile) for h in want]
    assert doc["query"]["roi"] == [64.0, 96.0, 96.0, 64.0]
    first = doc["hits"][0]
    assert first["w"] == first["h"] == 32.0 and first["rank"] == 1

    csv_path = tmp_path / "out" / "hits.csv"
    code, out, _ = gpfm(capsys, "index", "search", lib, "--store", store, "--roi", "64,96,96,64",
                        "--top-k", 3, "--per-slide", 2, "--out", csv_path)
    assert code == 0 and f"wrote 6 hits to {csv_path}" in out
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_rank"] for r in rows] == ["1", "1", "2", "2", "3", "3"]
    assert len({r["slide_fingerprint"] for r in rows}) == 3
    assert [float(r["score"]) for r in rows][0] >= max(float(r["score"]) for r in rows[2:])

    code, out, _ = gpfm(capsys, "index", "search", lib, "--store", store, "--roi", "64,96",
                        "--top-k", 4)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "score", "x", "y", "w", "slide"]
    assert len(lines) == 5 and len(lines[1].split()) == 6
    code, out, _ = gpfm(capsys, "index", "search", lib, "--store", store, "--roi", "64,96",
                        "--top-k", 2, "--per-slide", 2)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["rank", "slide#", "score"]
    assert [line.split()[1] for line in lines[1:]] == ["1", "1", "2", "2"]

    code, out, _ = gpfm(capsys, "index", "remove", lib, "slide0.tif", "--quiet")
    assert code == 0 and "removed" in out and "2 slides, 512 tiles left" in out
    code, out, _ = gpfm(capsys, "index", "add", lib, stores_dir / "slide0" / "x.zarr", "--quiet")
    assert code == 0 and out.startswith("added 1 slides, refreshed 0: 3 slides, 768 tiles")


def test_errors_are_one_line(tmp_path, capsys, stores_dir):
    lib = tmp_path / "lib"
    assert gpfm(capsys, "index", "build", stores_dir, "--out", lib, "--quiet")[0] == 0

    def fails(*argv, match):
        code, out, err = gpfm(capsys, *argv)
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err

    fails("index", "search", lib, match="give a query")
    fails("index", "search", lib, "--image", "x.png", "--store", "s", "--roi", "1,2,3,4",
          match="either --image")
    fails("index", "search", lib, "--store", stores_dir / "slide0" / "x.zarr", "--roi",
          "1,2,3", match="--roi")
    fails("index", "search", lib, "--image", tmp_path / "none.png", match="no such file")
    fails("index", "search", lib, "--store", stores_dir / "slide0" / "x.zarr", "--roi",
          "9000,10", match="--roi 9000,10 lies outside the 512 x 512 px slide")
    fails("index", "build", stores_dir, "--out", lib, match="already holds a library")
    fails("index", "build", tmp_path / "nothing", "--out", tmp_path / "l2", match="does not exist")
    fails("index", "build", stores_dir, "--out", tmp_path / "l3", "--kind", "ivfpq",
          match="at least 10000 vectors")
    fails("index", "remove", lib, "unknown.svs", match="no slide 'unknown.svs'")
    fails("index", "info", tmp_path / "nolib", match="no library")

    meta = json.loads((lib / "meta.json").read_text())
    index = lib / meta["files"]["index"]["path"]
    index.write_bytes(index.read_bytes()[:100])
    fails("index", "search", lib, "--store", stores_dir / "slide0" / "x.zarr", "--roi",
          "0,0,64,64", match="truncated")

    code, out, _ = gpfm(capsys, "index")
    assert code == 2 and "build" in out and "search" in out


def test_build_help_states_the_trade_off(capsys):
    with pytest.raises(SystemExit) as done:
        main(["index", "build", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for needle in ("flat", "ivfpq", "hnsw", "auto", "recall@100 >= 0.95", "per tile",
                   "2M tiles", "nprobe"):
        assert needle in text, needle


# ---------------------------------------------------------------------- --image
def _random_weights(path, seed):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, sample_slide_path):
    """The sample slide and a synthetic one embedded by a real ViT, and the library of both."""
    root = tmp_path_factory.mktemp("cli-image")
    weights = _random_weights(root / f"{ARCH}.safetensors", seed=0)
    encoder = load_encoder(f"timm:{ARCH}", weights=weights)
    spec = TilingSpec(mpp=1.0, read_size=160, model_size=160)
    other = write_synthetic_slide(root / "other.tif", 1280, 1280, mpp=0.5, seed=5)
    tiles = {}
    for name, path in (("sample", sample_slide_path), ("other", other)):
        with open_slide(path) as slide:
            grid = make_grid(slide, spec)
            store = prepare_store(root / f"{name}.zarr", slide=slide, grid=grid, encoder=encoder)
            embed_slide(slide, grid, encoder, store, device="cpu", batch_size=16, num_workers=0)
            if name == "sample":
                with TileLoader(slide, grid, batch_size=len(grid), num_workers=0) as loader:
                    batch = next(iter(loader))
                tiles = {int(i): img for i, img in zip(batch.indices, batch.images,
                                                       strict=True)}
    lib = LibraryIndex.build([root / "sample.zarr", root / "other.zarr"], root / "lib")
    return {"root": root, "weights": weights, "lib": lib.path, "tiles": tiles}


def test_image_query_finds_its_own_tile(capsys, embedded):
    from PIL import Image

    tile = sorted(embedded["tiles"])[len(embedded["tiles"]) // 2]
    png = embedded["root"] / "query.png"
    Image.fromarray(embedded["tiles"][tile]).save(png)
    for extra in (["--weights", embedded["weights"]], []):  # default: the recorded weights
        code, out, err = gpfm(capsys, "index", "search", embedded["lib"], "--image", png,
                              "--device", "cpu", "--top-k", 3, "--json", *extra)
        assert code == 0, err
        doc = json.loads(out)
        best = doc["hits"][0]
        assert best["slide_name"] == "CMU-1-Small-Region.svs" and best["tile"] == tile
        assert best["score"] > 0.999
        assert doc["query"]["image"] == str(png.resolve())


def test_image_query_reads_a_jpeg_tiff_that_pillow_cannot(capsys, embedded, extra_he_dir):
    # Pillow's libtiff rejects this OME-TIFF crop ("Improper JPEG sampling factors") and
    # printed its complaint to stderr before our error; the slide reader's decoder reads it.
    crop = extra_he_dir / "openslide_os1_crop" / "OS-1-detail.ome.tif"
    code, out, err = gpfm(capsys, "index", "search", embedded["lib"], "--image", crop,
                          "--device", "cpu", "--top-k", 1, "--json")
    assert code == 0 and err == "", err
    assert len(json.loads(out)["hits"]) == 1


def test_image_query_with_other_weights_is_refused(capsys, embedded):
    from PIL import Image

    png = embedded["root"] / "q2.png"
    Image.fromarray(next(iter(embedded["tiles"].values()))).save(png)
    other = _random_weights(embedded["root"] / "other.safetensors", seed=1)
    code, _, err = gpfm(capsys, "index", "search", embedded["lib"], "--image", png,
                        "--weights", other, "--device", "cpu")
    assert code == 2 and "sha256" in err and "pass the weights the stores were made with" in err
    assert len(err.strip().splitlines()) == 1


def _synthetic_store(slide_path, store_path, seed, gen, overwrite=False, pooling="cls"):
    meta = {"encoder_id": "timm:x@ababababab", "encoder_name": "timm:x",
            "weights_sha256": "ab" * 32, "embed_dim": D}
    write_synthetic_slide(slide_path, 256, 256, mpp=0.5, seed=seed)
    with open_slide(slide_path) as slide:
        store = EmbeddingStore.create(store_path, slide=slide, grid=make_grid(slide, SPEC),
                                      encoder_meta=meta, overwrite=overwrite, pooling=pooling)
        store.write(np.arange(store.n_tiles), gen.chunk(0, store.n_tiles))
        store.finalize()


def test_a_changed_slide_is_reported_and_its_new_store_replaces_it(tmp_path, capsys):
    # Before, `index add` of the re-embedded store kept the old entry beside the new one (the
    # fingerprint differs), and every search then asked for the same `index add` again.
    gen = ClusteredEmbeddings(D, n_clusters=4, seed=0)
    slide, store = tmp_path / "s.tif", tmp_path / "emb" / "s" / "x.zarr"
    _synthetic_store(slide, store, 0, gen)
    lib = tmp_path / "lib"
    assert gpfm(capsys, "index", "build", store, "--out", lib, "--quiet")[0] == 0
    _synthetic_store(slide, store.with_name("tmp.zarr"), 1, gen)  # the slide file changes
    code, out, _ = gpfm(capsys, "index", "info", lib)
    assert code == 0 and "slide changed" in out
    assert f"`gpfm embed {slide} --out {store.parent.parent} --overwrite`" in out
    _synthetic_store(slide, store, 1, gen, overwrite=True)
    code, out, err = gpfm(capsys, "index", "add", lib, store, "--quiet")
    assert code == 0 and out.startswith("added 0 slides, refreshed 1: 1 slides"), (out, err)
    code, out, err = gpfm(capsys, "index", "search", lib, "--store", store, "--roi", "64,64")
    assert code == 0 and "rank" in out, err
    assert [s["status"] for s in LibraryIndex.open(lib).info()["slides"]] == ["ok"]


def test_a_query_store_of_another_pooling_is_told_the_pooling_to_embed_with(tmp_path, capsys):
    gen = ClusteredEmbeddings(D, n_clusters=4, seed=0)
    mean = tmp_path / "mean" / "s" / "x.zarr"
    _synthetic_store(tmp_path / "s.tif", mean, 0, gen, pooling="mean")
    cls = tmp_path / "cls" / "s" / "x.zarr"
    _synthetic_store(tmp_path / "s.tif", cls, 0, gen)
    lib = tmp_path / "lib"
    assert gpfm(capsys, "index", "build", mean, "--out", lib, "--quiet")[0] == 0
    code, _, err = gpfm(capsys, "index", "search", lib, "--store", cls, "--roi", "64,64")
    assert code == 2 and "--min-tissue 0 --pooling mean`" in err, err


def test_ctrl_c_says_what_survives_for_each_command(monkeypatch, capsys):
    import napari_gpfm.cli.embed as embed_cli
    import napari_gpfm.cli.index as index_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_cli, "run_add", interrupted)
    monkeypatch.setattr(embed_cli, "run", interrupted)
    code, _, err = gpfm(capsys, "index", "add", "lib", "store.zarr")
    assert code == 130 and "a library changes all at once or not at all" in err
    code, _, err = gpfm(capsys, "embed", "slide.svs")
    assert code == 130 and "run the same command again to resume" in err


def test_tied_hits_are_ordered_the_same_for_every_top_k(tmp_path, capsys):
    # Two slides with identical vectors tie tile for tile; the best 2 used to differ from the
    # first 2 of the best 3.
    gen = ClusteredEmbeddings(D, n_clusters=4, seed=0)
    stores = []
    for seed in (0, 1):
        stores.append(tmp_path / "emb" / f"s{seed}" / "x.zarr")
        _synthetic_store(tmp_path / f"s{seed}.tif", stores[-1], seed, gen)
    lib = tmp_path / "lib"
    assert gpfm(capsys, "index", "build", *stores, "--out", lib, "--quiet")[0] == 0
    runs = []
    for k in (1, 2, 3, 4, 7):
        code, out, err = gpfm(capsys, "index", "search", lib, "--store", stores[0], "--roi",
                              "100,100", "--top-k", k, "--json")
        assert code == 0, err
        runs.append([(h["slide_name"], h["tile"]) for h in json.loads(out)["hits"]])
        assert all(h["score"] <= 1.0 for h in json.loads(out)["hits"])
    for shorter, longer in zip(runs, runs[1:], strict=False):
        assert longer[:len(shorter)] == shorter
