"""The embedding store (zarr v3): layout, identity, resume bookkeeping, corruption, h5 interop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from napari_gpfm.embedding.h5io import export_h5, import_h5, read_h5
from napari_gpfm.embedding.store import EmbeddingStore, default_store_path, slide_stem
from napari_gpfm.errors import ParameterError, StoreError
from napari_gpfm.slides import open_slide
from napari_gpfm.tiling import TilingSpec, make_grid

D = 8


def _meta(name: str = "timm:test_vit", sha: str = "ab" * 32, dim: int = D) -> dict:
    return {
        "encoder_id": f"{name}@{sha[:12]}",
        "encoder_name": name,
        "weights_sha256": sha,
        "embed_dim": dim,
        "token_dim": dim,
        "preprocessing": {"input_size": 160, "mean": [0.5] * 3, "std": [0.5] * 3,
                          "interpolation": "bicubic"},
    }


@pytest.fixture(scope="module")
def slide(sample_slide_path):
    with open_slide(sample_slide_path) as s:
        yield s


@pytest.fixture(scope="module")
def grid(slide):
    return make_grid(slide, TilingSpec(mpp=1.0, read_size=160, model_size=160))


def _features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _full_store(path, slide, grid, **kw) -> EmbeddingStore:
    store = EmbeddingStore.create(path, slide=slide, grid=grid, encoder_meta=_meta(), **kw)
    store.write(np.arange(store.n_tiles), _features(store.n_tiles))
    store.finalize()
    return store


def test_create_records_layout_and_attributes(tmp_path, slide, grid):
    store = EmbeddingStore.create(tmp_path / "s.zarr", slide=slide, grid=grid,
                                  encoder_meta=_meta())
    n = len(grid)
    assert n > 10
    assert store.n_tiles == n and store.embed_dim == D
    assert store.n_done == 0 and not store.is_complete
    np.testing.assert_array_equal(store.all_coords, grid.coords)
    assert store.features.shape == (0, D) and store.coords.shape == (0, 2)
    attrs = store.attrs
    for key in ("encoder_id", "encoder_name", "weights_sha256", "preprocessing", "target_mpp",
                "read_size", "model_size", "stride", "tissue", "tiling", "tiling_id",
                "slide_path", "slide_fingerprint", "slide_dimensions", "slide_mpp",
                "tile_size_l0", "napari_gpfm_version", "created", "updated", "complete"):
        assert key in attrs, key
    assert attrs["tiling_id"] == grid.spec.id
    assert TilingSpec.from_dict(attrs["tiling"]) == grid.spec
    assert attrs["slide_fingerprint"] == slide.fingerprint
    assert attrs["slide_dimensions"] == list(slide.dimensions)
    assert store.tile_size_l0 == pytest.approx(grid.tile_size_l0)
    assert store.identity == EmbeddingStore.identity_of(
        slide=slide, encoder_meta=_meta(), spec=grid.spec)
    # zarr v3 on disk, features chunked by rows
    doc = json.loads((tmp_path / "s.zarr" / "features" / "zarr.json").read_text())
    assert doc["zarr_format"] == 3 and doc["data_type"] == "float16"
    assert doc["chunk_grid"]["configuration"]["chunk_shape"][1] == D


def test_write_marks_done_and_reads_aligned_rows(tmp_path, slide, grid):
    store = EmbeddingStore.create(tmp_path / "s.zarr", slide=slide, grid=grid,
                                  encoder_meta=_meta())
    feats = _features(store.n_tiles)
    store.write(np.arange(0, 4), feats[:4])
    store.write(np.array([7, 9]), feats[[7, 9]])  # not a contiguous run
    assert store.n_done == 6
    np.testing.assert_array_equal(store.done_indices, [0, 1, 2, 3, 7, 9])
    got = store.features
    assert got.dtype == np.float32 and got.shape == (6, D)
    np.testing.assert_allclose(got, feats[[0, 1, 2, 3, 7, 9]], atol=2e-3, rtol=1e-3)
    np.testing.assert_array_equal(store.coords, grid.coords[[0, 1, 2, 3, 7, 9]])
    assert not store.finalize()
    reopened = EmbeddingStore.open(tmp_path / "s.zarr")
    assert reopened.n_done == 6 and reopened.attrs["complete"] is False
    with pytest.raises(StoreError, match="read-only"):
        reopened.write(np.array([5]), feats[[5]])
    rest = np.setdiff1d(np.arange(store.n_tiles), store.done_indices)
    store.write(rest, feats[rest])
    assert store.finalize() and store.is_complete
    np.testing.assert_allclose(EmbeddingStore.open(tmp_path / "s.zarr").features, feats,
                               atol=2e-3, rtol=1e-3)


def test_float32_store_is_exact_and_fp16_overflow_is_refused(tmp_path, slide, grid):
    store = EmbeddingStore.create(tmp_path / "f32.zarr", slide=slide, grid=grid,
                                  encoder_meta=_meta(), dtype="float32")
    feats = _features(2) * 1e5
    store.write(np.array([0, 1]), feats)
    np.testing.assert_array_equal(store.read_features(np.array([0, 1])), feats)
    half = EmbeddingStore.create(tmp_path / "f16.zarr", slide=slide, grid=grid,
                                 encoder_meta=_meta())
    with pytest.raises(ParameterError, match="float32"):
        half.write(np.array([0, 1]), feats)
    assert half.n_done == 0
    with pytest.raises(ParameterError, match="do not fit"):
        half.write(np.array([0, 1]), _features(3))


@pytest.mark.parametrize(
    ("change", "label"),
    [
        ({"encoder_id": "gpfm@0123456789ab"}, "encoder"),
        ({"weights_sha256": "cd" * 32}, "weights file"),
        ({"tiling_id": "0" * 12}, "tiling"),
        ({"slide_fingerprint": "ef" * 32}, "slide content"),
        ({"pooling": "mean"}, "pooling"),
    ],
)
def test_other_identity_is_refused_with_what_differs(tmp_path, slide, grid, change, label):
    _full_store(tmp_path / "s.zarr", slide, grid)
    expected = EmbeddingStore.identity_of(slide=slide, encoder_meta=_meta(), spec=grid.spec)
    assert EmbeddingStore.open(tmp_path / "s.zarr", expected).is_complete
    with pytest.raises(StoreError) as info:
        EmbeddingStore.open(tmp_path / "s.zarr", {**expected, **change})
    msg = str(info.value)
    assert label in msg and "--overwrite" in msg and "\n" not in msg


def test_existing_store_needs_overwrite_and_foreign_folders_are_never_deleted(
        tmp_path, slide, grid):
    path = tmp_path / "s.zarr"
    _full_store(path, slide, grid)
    with pytest.raises(StoreError, match="--overwrite"):
        EmbeddingStore.create(path, slide=slide, grid=grid, encoder_meta=_meta())
    fresh = EmbeddingStore.create(path, slide=slide, grid=grid, encoder_meta=_meta(),
                                  overwrite=True)
    assert fresh.n_done == 0
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.txt").write_text("do not lose me")
    with pytest.raises(StoreError, match="not a napari-gpfm embedding store"):
        EmbeddingStore.create(precious, slide=slide, grid=grid, encoder_meta=_meta(),
                              overwrite=True)
    assert (precious / "chapter1.txt").exists()


def test_corrupted_or_foreign_stores_raise_store_error(tmp_path, slide, grid):
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore.open(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(StoreError, match="no zarr.json"):
        EmbeddingStore.open(tmp_path / "empty.zarr")

    path = tmp_path / "s.zarr"
    _full_store(path, slide, grid)
    # The folder holding a store (gpfm embed's per-slide folder) names what it holds.
    with pytest.raises(StoreError, match=r"no zarr.json\); it holds s\.zarr: point to one"):
        EmbeddingStore.open(tmp_path)
    shutil.rmtree(path / "done")
    with pytest.raises(StoreError, match="missing array 'done'"):
        EmbeddingStore.open(path)

    path2 = tmp_path / "s2.zarr"
    _full_store(path2, slide, grid)
    doc = json.loads((path2 / "zarr.json").read_text())
    del doc["attributes"]["tile_size_l0"]
    (path2 / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="attribute 'tile_size_l0'"):
        EmbeddingStore.open(path2)
    (path2 / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="corrupted"):
        EmbeddingStore.open(path2)

    path3 = tmp_path / "s3.zarr"
    _full_store(path3, slide, grid)
    chunk = next(p for p in (path3 / "features").rglob("*") if p.is_file() and
                 p.name != "zarr.json")
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # a torn chunk file
    with pytest.raises(StoreError, match="cannot read 'features'"):
        _ = EmbeddingStore.open(path3).features

    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something"
    with pytest.raises(StoreError, match="not a napari-gpfm embedding store"):
        EmbeddingStore.open(tmp_path / "other.zarr")


def test_patch_tokens_array(tmp_path, slide, grid):
    store = EmbeddingStore.create(tmp_path / "p.zarr", slide=slide, grid=grid,
                                  encoder_meta=_meta(), patch_tokens_shape=(2, 3, 4))
    assert store.patch_tokens_shape == (2, 3, 4)
    tokens = np.random.default_rng(1).normal(size=(2, 2, 3, 4)).astype(np.float32)
    with pytest.raises(ParameterError, match="patch_tokens"):
        store.write(np.array([0, 1]), _features(2))
    store.write(np.array([0, 1]), _features(2), tokens)
    np.testing.assert_allclose(store.read_patch_tokens(np.array([0, 1])), tokens, atol=2e-3)
    plain = _full_store(tmp_path / "plain.zarr", slide, grid)
    with pytest.raises(StoreError, match="--patch-tokens"):
        plain.read_patch_tokens(np.array([0]))


def test_writer_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path, slide, grid):
    store = EmbeddingStore.create(tmp_path / "s.zarr", slide=slide, grid=grid,
                                  encoder_meta=_meta())
    with store.writer_lock():
        assert store.lock_path.is_file()
        with pytest.raises(StoreError, match="another run"), store.writer_lock():
            pass
    assert not store.lock_path.exists()
    # A lock left by a process that no longer exists (killed) does not block the next run.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import socket

    store.lock_path.write_text(f"{dead}@{socket.gethostname()}")
    with store.writer_lock():
        assert store.lock_path.read_text().startswith(str(os.getpid()))


def test_default_store_path(tmp_path, slide, grid):
    path = default_store_path(tmp_path, slide, "timm:vit_small", grid.spec)
    assert path == tmp_path / "CMU-1-Small-Region" / f"timm-vit_small-{grid.spec.id}.zarr"
    assert slide_stem("/x/a.b.ome.tiff") == "a.b" and slide_stem("c.svs") == "c"


# ---------------------------------------------------------------------------- h5 interop
def test_h5_export_import_round_trip(tmp_path, slide, grid):
    store = _full_store(tmp_path / "s.zarr", slide, grid)
    h5 = export_h5(store, tmp_path / "s.h5")
    with h5py.File(h5, "r") as fh:
        assert fh["features"].shape == (store.n_tiles, D)
        assert fh["features"].dtype == np.float32
        assert fh["coords"].dtype == np.int64
        cattrs = dict(fh["coords"].attrs)
    # What TRIDENT reads (and CLAM's legacy fields)
    assert cattrs["patch_size"] == 160
    assert cattrs["patch_size_level0"] == round(grid.tile_size_l0)
    assert cattrs["target_magnification"] == 10 and cattrs["level0_magnification"] == 20
    assert cattrs["overlap"] == 0 and cattrs["name"] == "CMU-1-Small-Region"
    assert cattrs["patch_level"] == 0

    data = read_h5(h5)
    assert data.source == "napari-gpfm"
    assert data.patch_size_level0 == pytest.approx(grid.tile_size_l0)
    back = import_h5(h5, tmp_path / "back.zarr", slide=slide)
    assert back.identity == store.identity and back.is_complete
    np.testing.assert_array_equal(back.coords, store.coords)
    np.testing.assert_array_equal(back.features, store.features)
    # No slide needed for our own files; the wrong slide is refused.
    assert import_h5(h5, tmp_path / "back2.zarr").identity == store.identity
    other = tmp_path / "other.svs"
    other.write_bytes(slide.path.read_bytes() + b"\0")
    with open_slide(other, mpp=slide.mpp) as wrong, pytest.raises(StoreError,
                                                                  match="another slide"):
        import_h5(h5, tmp_path / "back3.zarr", slide=wrong)


def test_h5_export_refuses_incomplete_store(tmp_path, slide, grid):
    store = EmbeddingStore.create(tmp_path / "s.zarr", slide=slide, grid=grid,
                                  encoder_meta=_meta())
    store.write(np.array([0]), _features(1))
    with pytest.raises(StoreError, match="incomplete"):
        export_h5(store, tmp_path / "s.h5")
    assert not (tmp_path / "s.h5").exists()
    path = export_h5(store, tmp_path / "part.h5", allow_incomplete=True)
    assert read_h5(path).features.shape == (1, D)


def _write_foreign(path, coords, feats, coord_attrs, feature_attrs=None):
    with h5py.File(path, "w") as fh:
        fset = fh.create_dataset("features", data=feats)
        for k, v in (feature_attrs or {}).items():
            fset.attrs[k] = v
        cset = fh.create_dataset("coords", data=coords)
        for k, v in coord_attrs.items():
            cset.attrs[k] = v


def test_trident_and_clam_files_are_read_and_imported(tmp_path, slide):
    coords = np.array([[0, 0], [512, 0], [0, 512]], dtype=np.int64)
    feats = _features(3)
    trident = tmp_path / "trident.h5"
    _write_foreign(trident, coords, feats,
                   {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 20,
                    "target_magnification": 10, "overlap": 0, "name": "CMU-1-Small-Region",
                    "savetodir": "/x"},
                   {"name": "CMU-1-Small-Region", "savetodir": "/x"})
    data = read_h5(trident)
    assert data.source == "trident" and data.patch_size == 256
    assert data.patch_size_level0 == 512 and data.target_mpp == pytest.approx(1.0)
    store = import_h5(trident, tmp_path / "t.zarr", slide=slide, encoder_name="uni_v1")
    assert store.is_complete and store.attrs["encoder_name"] == "uni_v1"
    assert store.attrs["imported_format"] == "trident"
    assert store.tile_size_l0 == 512
    assert store.attrs["target_mpp"] == pytest.approx(slide.mpp * 2)
    np.testing.assert_array_equal(store.coords, coords)
    np.testing.assert_array_equal(store.features, feats)
    with pytest.raises(ParameterError, match="pass the slide"):
        import_h5(trident, tmp_path / "t2.zarr")

    clam = tmp_path / "clam.h5"  # CLAM: level 1 of a 4x pyramid, 256 px patches
    _write_foreign(clam, coords, feats, {"patch_size": 256, "patch_level": 1,
                                         "downsample": np.array([4.0, 4.0])})
    assert read_h5(clam).patch_size_level0 == 1024 and read_h5(clam).source == "clam"

    bad = tmp_path / "bad.h5"
    _write_foreign(bad, coords, feats[:2], {})
    with pytest.raises(StoreError, match="inconsistent"):
        read_h5(bad)
    with h5py.File(tmp_path / "nofeat.h5", "w") as fh:
        fh.create_dataset("coords", data=coords)
    with pytest.raises(StoreError, match="'features'"):
        read_h5(tmp_path / "nofeat.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(StoreError, match="HDF5"):
        read_h5(tmp_path / "text.h5")


def test_creation_is_atomic_and_abandoned_builds_are_cleared(tmp_path, slide, grid):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    abandoned = tmp_path / f".s.zarr.creating-{dead}"  # a process killed while creating
    abandoned.mkdir()
    (abandoned / "zarr.json").write_text("{}")
    store = EmbeddingStore.create(tmp_path / "s.zarr", slide=slide, grid=grid,
                                  encoder_meta=_meta())
    assert not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert store.path == tmp_path / "s.zarr" and store.n_tiles == len(grid)
    store.write(np.array([0]), _features(1))
    assert EmbeddingStore.open(tmp_path / "s.zarr").n_done == 1
