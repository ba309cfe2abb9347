"""Library region queries and the gallery's Qt-free parts, on a real two-slide library.

The same query through :func:`search_roi`, ``gpfm index search`` and the gallery job gives the
same hits; thumbnails are the slides' own pixels; the camera frames a hit where napari draws it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _library_fixtures import NO_MPP_MPP, build_library, build_library_with_unscaled_slide

from napari_gpfm.analysis.geometry import Roi
from napari_gpfm.cli import main
from napari_gpfm.embedding.store import EmbeddingStore
from napari_gpfm.errors import ParameterError, StoreError
from napari_gpfm.library import LibraryIndex
from napari_gpfm.library.gallery import (
    GalleryHits,
    GalleryStage,
    Thumbnail,
    box_corners,
    camera_for_box,
    gallery_search,
    iter_thumbnails,
    read_thumbnail,
)
from napari_gpfm.library.query import SearchOptions, check_query_store, search_roi
from napari_gpfm.slides import open_slide, resize_rgb


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("gallery"))


def _roi(store_path, rows=(10, 11)):
    """A level-0 rectangle around tiles ``rows`` of a store (their centres inside)."""
    store = EmbeddingStore.open(store_path)
    xy = store.coords[list(rows)]
    size = store.tile_size_l0
    lo, hi = xy.min(axis=0) + size * 0.25, xy.max(axis=0) + size * 0.75
    return Roi.rectangle(lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])


def _inside(store_path, roi):
    from napari_gpfm.analysis.geometry import tiles_in_roi

    store = EmbeddingStore.open(store_path)
    return tiles_in_roi(store.coords, store.tile_size_l0, roi)


# ----------------------------------------------------------------------------- queries
def test_roi_query_same_hits_from_core_and_cli(lib, capsys):
    library = LibraryIndex.open(lib["library"])
    roi = _roi(lib["sample_store"])
    hits = search_roi(library, lib["sample_store"], roi, SearchOptions(top_k=len(library)))
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert {h.slide_name for h in hits} == {"CMU-1-Small-Region.svs", "OS-1-detail.ome.tif"}
    # the query's own tiles are left out unless asked for
    assert len(hits) == len(library) - len(_inside(lib["sample_store"], roi))
    one = _roi(lib["sample_store"], rows=(12,))
    own = search_roi(library, lib["sample_store"], one, SearchOptions(top_k=1, include_query=True))
    assert own[0].tile == 12 and own[0].score > 0.999

    x, y, w, h = roi.bounds
    code = main(["index", "search", str(lib["library"]), "--store", str(lib["sample_store"]),
                 "--roi", f"{x},{y},{w},{h}", "--top-k", "7", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(r["slide_fingerprint"], r["tile"]) for r in doc["hits"]] == [
        (h.slide_fingerprint, h.tile) for h in hits[:7]]

    grouped = search_roi(library, lib["sample_store"], roi, SearchOptions(top_k=2, per_slide=3))
    assert [h.slide_rank for h in grouped] == [1, 1, 1, 2, 2, 2]
    assert len({h.slide_fingerprint for h in grouped}) == 2


def test_query_store_refusals_are_one_line(lib, tmp_path):
    library = LibraryIndex.open(lib["library"])
    with pytest.raises(StoreError) as err:
        check_query_store(library, lib["mismatched_store"])
    text = str(err.value)
    assert "\n" not in text and "does not fit library" in text and "tiling" in text
    assert str(lib["mismatched_store"]) in text
    assert "gpfm embed SLIDE --model default --mpp 1 --read-size 64 --size 112" in text
    # In words, with every setting, so that the one that differs shows.
    assert ("tiles of 64 px at 2.0 um/px resized to 112 px, stride 64 px, min. tissue 0.5 "
            "instead of 64 px at 1.0 um/px resized to 112 px, stride 64 px") in text
    with pytest.raises(StoreError, match="does not exist"):
        check_query_store(library, tmp_path / "nowhere.zarr")
    with pytest.raises(ParameterError, match="top_k=0"):
        SearchOptions(top_k=0)
    with pytest.raises(ParameterError, match="per_slide=0"):
        SearchOptions(per_slide=0)
    # the CLI says the same in one line
    code = main(["index", "search", str(lib["library"]), "--store", str(lib["mismatched_store"]),
                 "--roi", "100,100,400,400"])
    assert code == 2


def test_unfinished_query_store_is_refused(lib, tmp_path):
    from napari_gpfm.tiling import TilingSpec, make_grid

    source = EmbeddingStore.open(lib["sample_store"])
    with open_slide(lib["sample_slide"]) as slide:
        spec = TilingSpec(mpp=1.0, read_size=64, model_size=112)
        half = EmbeddingStore.create(tmp_path / "half.zarr", slide=slide,
                                     grid=make_grid(slide, spec), spec=spec,
                                     encoder_meta=source.attrs["encoder"])
    half.write(np.arange(3), source.read_features(np.arange(3)))
    with pytest.raises(StoreError, match=r"is not finished \(3/\d+ tiles\)"):
        check_query_store(LibraryIndex.open(lib["library"]), half.path)


# ----------------------------------------------------------------------------- thumbnails
def test_thumbnail_is_the_slide_region(lib):
    store = EmbeddingStore.open(lib["sample_store"])
    x, y = store.coords[20]
    size = store.tile_size_l0
    with open_slide(lib["sample_slide"]) as slide:
        thumb = read_thumbnail(slide, (x, y, size, size), 64)
        region = slide.read_region((int(x), int(y)), 0, (round(size), round(size)))
        wide = read_thumbnail(slide, (x, y, 2 * size, size), 64)
        with pytest.raises(ParameterError, match="size=0"):
            read_thumbnail(slide, (x, y, size, size), 0)
        with pytest.raises(ParameterError, match="positive width"):
            read_thumbnail(slide, (x, y, 0, size))
    assert thumb.shape == (64, 64, 3) and thumb.dtype == np.uint8
    np.testing.assert_array_equal(thumb, resize_rgb(region, 64))
    assert wide.shape == (32, 64, 3)


def test_thumbnails_in_hit_order_and_unreadable_slides_reported(lib, tmp_path):
    library = LibraryIndex.open(lib["library"])
    hits = search_roi(library, lib["sample_store"], _roi(lib["sample_store"]),
                      SearchOptions(top_k=2, per_slide=2))
    gone = replace(hits[0], slide_path=str(tmp_path / "moved.svs"), slide_name="moved.svs")
    thumbs = list(iter_thumbnails([*hits, gone], size=32))
    assert [t.index for t in thumbs] == list(range(len(hits) + 1))
    assert all(t.image is not None and t.image.shape == (32, 32, 3) for t in thumbs[:-1])
    assert thumbs[-1].image is None and "moved.svs" in thumbs[-1].error


def test_gallery_job_yields_stages_hits_then_thumbnails(lib):
    events = list(gallery_search(lib["library"], lib["sample_store"], _roi(lib["sample_store"]),
                                 SearchOptions(top_k=5), thumbnail_px=24))
    kinds = [type(e) for e in events]
    found = next(e for e in events if isinstance(e, GalleryHits))
    assert kinds[0] is GalleryStage and kinds.index(GalleryHits) < kinds.index(Thumbnail)
    assert found.n_slides == 2 and len(found.hits) == 5
    assert found.info["encoder_id"] == lib["encoder_id"]
    thumbs = [e for e in events if isinstance(e, Thumbnail)]
    assert [t.index for t in thumbs] == list(range(5))
    assert all(t.image.shape == (24, 24, 3) for t in thumbs)


# ----------------------------------------------------------------------------- geometry
def test_box_corners_and_camera_follow_napari_convention():
    from napari_gpfm.napari._session import SlideRef

    box = (100.0, 40.0, 64.0, 64.0)
    np.testing.assert_array_equal(box_corners(box),
                                  [[100, 40], [164, 40], [164, 104], [100, 104]])
    ref = SlideRef(path=Path("s.svs"), fingerprint="f", name="s.svs",
                   dims=(1000, 800), mpp=0.25, scale_yx=(0.25, 0.26), translate_yx=(5.0, -3.0))
    view = camera_for_box(box, ref.scale_yx, ref.translate_yx, (600, 400), boxes_across=4)
    np.testing.assert_allclose(view.center_yx, ref.level0_to_world(np.array([[132.0, 72.0]]))[0])
    # the shorter canvas side (400 px) spans 4 box widths (64 px * 0.26 um) on screen
    assert view.zoom == pytest.approx(400 / (4 * 64 * 0.26))
    with pytest.raises(ParameterError, match="canvas size"):
        camera_for_box(box, (1, 1), (0, 0), (0, 400))
    with pytest.raises(ParameterError, match="x, y, w, h"):
        box_corners((1, 2, 3))


def test_hits_on_a_slide_without_pixel_size_keep_the_embedding_one(tmp_path):
    """A slide whose file records no um/px was embedded with one the user gave: its hits carry
    that value (the viewer opens the slide with it), and its thumbnails read."""
    built = build_library_with_unscaled_slide(tmp_path)
    with open_slide(built["unscaled_slide"]) as slide:
        assert not slide.has_mpp
    library = LibraryIndex.open(built["library"])
    hits = search_roi(library, built["unscaled_store"], _roi(built["unscaled_store"], (0, 1)),
                      SearchOptions(top_k=200, include_query=True))
    unscaled = [h for h in hits if Path(h.slide_path) == built["unscaled_slide"]]
    assert unscaled and all(h.slide_mpp == pytest.approx(NO_MPP_MPP) for h in unscaled)
    assert all(h.slide_mpp == pytest.approx(0.499) for h in hits if h not in unscaled)
    thumbs = list(iter_thumbnails(hits[:20], size=32))
    assert [t.error for t in thumbs] == [None] * len(thumbs)
