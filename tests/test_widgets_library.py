"""Similar regions panel, "Search in: a library", end to end on a real two-slide library (Xvfb).

The sample and the OS-1 crop are embedded by the embedded default model and indexed together
(:mod:`_library_fixtures`). The panel searches the library with a box drawn on the sample,
fills the gallery with thumbnails read from both slides, and a click opens the other slide (or
switches back to the sample without opening it twice), framed on the hit.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
# Load Triton (through timm -> torch._dynamo) before any viewer maps Mesa's libLLVM: loaded
# after it, the two LLVMs collide and the process segfaults (see napari/_llvm_guard.py).
import timm  # noqa: E402, F401
from _library_fixtures import (  # noqa: E402
    NO_MPP_MPP,
    build_library,
    build_library_with_unscaled_slide,
)

from napari_gpfm.embedding.store import EmbeddingStore  # noqa: E402
from napari_gpfm.library.gallery import box_corners, read_thumbnail  # noqa: E402
from napari_gpfm.napari._session import SlideRef, reset_sessions  # noqa: E402
from napari_gpfm.slides import open_slide  # noqa: E402

pytestmark = pytest.mark.viewer
TIMEOUT_MS = 60_000
SAMPLE = "CMU-1-Small-Region.svs"
OTHER = "OS-1-detail.ome.tif"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("widget-library"))


@pytest.fixture
def panel(make_napari_viewer_proxy, lib, tmp_path, monkeypatch):
    """A viewer with the sample open and the Similar regions panel searching the library."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no store found by itself
    reset_sessions()
    v = make_napari_viewer_proxy()
    [slide] = v.open_sample("napari-gpfm", "cmu_small_region")
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "Similar regions")
    widget.scope_combo.setCurrentText("a library")
    yield v, SlideRef.from_layer(slide), widget
    reset_sessions()


def _draw_box(v, widget, ref, lo, hi):
    widget.box_button.click()
    v.layers["similarity query"].add_rectangles(ref.level0_to_data(np.array([lo, hi])))


def _query_tiles(store_path, rows):
    store = EmbeddingStore.open(store_path)
    xy = store.coords[list(rows)]
    size = store.tile_size_l0
    return xy.min(axis=0) + size * 0.25, xy.max(axis=0) + size * 0.75


def _search(widget, qtbot):
    widget.search_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)


def _slide_layers(v, name):
    return [lay for lay in v.layers if SlideRef.from_layer(lay) is not None and lay.name == name]


def _assert_framed(v, layer, hit):
    """The camera centre lies inside the hit's box, drawn on ``layer``'s slide."""
    world = SlideRef.from_layer(layer).level0_to_world(box_corners(hit.box))
    centre = np.asarray(v.scene.camera.center[-2:])
    assert np.all(centre >= world.min(axis=0)) and np.all(centre <= world.max(axis=0))


def test_library_gallery_opens_and_switches_slides(panel, lib, qtbot, messages):
    v, ref, widget = panel
    # napari pads docks that do not ask for height with a stretch; that would leave the gallery
    # one row of thumbnails without captions.
    layout = widget.layout()
    assert layout.itemAt(layout.count() - 1).spacerItem() is None
    widget.store_row.use_store(lib["sample_store"])
    assert widget.results.currentWidget() is widget.library_results
    assert widget.search_button.text() == "Search the library"

    widget.search_button.click()  # no library chosen yet
    assert any("no library chosen" in m for m in messages)
    widget.library_row.set_library(lib["library"])
    assert "2 slides" in widget.library_row.label.text()

    _draw_box(v, widget, ref, *_query_tiles(lib["sample_store"], (10, 11)))
    widget.k_spin.setValue(500)  # every tile of the library
    _search(widget, qtbot)
    results = widget.library_results
    gallery = results.gallery
    hits = gallery.hits
    n_library = sum(EmbeddingStore.open(s).n_tiles for s in (lib["sample_store"],
                                                              lib["other_store"]))
    assert 0 < n_library - len(hits) <= 4  # the query's own tiles are left out
    assert gallery.count() == len(hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert {h.slide_name for h in hits} == {SAMPLE, OTHER}
    assert f"from 2 slide(s) of {lib['library'].name}" in widget.status.text()
    # every thumbnail arrived, read from its own slide
    assert sorted(results.thumbnails) == list(range(len(hits)))
    assert all(not gallery.item(i).icon().isNull() for i in range(len(hits)))
    i_other = next(i for i, h in enumerate(hits) if h.slide_name == OTHER)
    with open_slide(lib["other_slide"]) as slide:
        np.testing.assert_array_equal(results.thumbnails[i_other].image,
                                      read_thumbnail(slide, hits[i_other].box))
    assert gallery.item(i_other).text().endswith(f"{hits[i_other].score:.3f}")

    # A hit on the other slide: it opens, the sample and its query are hidden, the hit framed.
    gallery.itemClicked.emit(gallery.item(i_other))
    [other] = _slide_layers(v, OTHER)
    [sample] = _slide_layers(v, SAMPLE)
    assert other.visible and not sample.visible and not v.layers["similarity query"].visible
    assert v.layers.selection.active.name == OTHER  # (the proxy wraps layers: compare names)
    _assert_framed(v, other, hits[i_other])
    outline = v.layers[f"{OTHER} · library match"]
    corners = np.array([outline.data_to_world(p) for p in outline.data[0]])
    expected = SlideRef.from_layer(other).level0_to_world(box_corners(hits[i_other].box))
    np.testing.assert_allclose(corners.min(axis=0), expected.min(axis=0), atol=1e-3)
    made = outline.metadata["gpfm_overlay"]  # what made the outline, saved with it as GeoJSON
    assert made["slide_fingerprint"] == hits[i_other].slide_fingerprint
    assert made["library"] == str(lib["library"]) and made["store"] == str(lib["other_store"])
    assert made["score"] == pytest.approx(hits[i_other].score)
    assert widget.slide_picker.current_layer().name == SAMPLE  # the query slide stays chosen

    # A hit on the sample: back to it without opening it again; the query shows again.
    i_same = next(i for i, h in enumerate(hits) if h.slide_name == SAMPLE)
    gallery.itemClicked.emit(gallery.item(i_same))
    assert len(_slide_layers(v, SAMPLE)) == 1 and len(_slide_layers(v, OTHER)) == 1
    assert sample.visible and not other.visible and not outline.visible
    assert v.layers["similarity query"].visible
    _assert_framed(v, sample, hits[i_same])
    assert f"#{hits[i_same].rank} of the library search" in widget.status.text()

    # The other slide again: still one layer of it.
    gallery.itemClicked.emit(gallery.item(i_other))
    assert len(_slide_layers(v, OTHER)) == 1 and other.visible and not sample.visible
    # Drawing a new query brings the query slide back.
    widget.box_button.click()
    assert sample.visible and not other.visible and v.layers["similarity query"].visible

    # Grouped by slide: the best 2 regions of each of the 2 slides.
    widget.group_check.setChecked(True)
    widget.per_slide_spin.setValue(2)
    widget.k_spin.setValue(2)
    assert widget.k_label.text() == "Top slides"
    _search(widget, qtbot)
    grouped = gallery.hits
    assert [h.slide_rank for h in grouped] == [1, 1, 2, 2]
    assert len({h.slide_name for h in grouped}) == 2 and gallery.count() == 4
    assert not any("Traceback" in m for m in messages)


def test_library_that_does_not_fit_the_store_is_a_clear_message(panel, lib, qtbot, messages):
    v, ref, widget = panel
    widget.store_row.use_store(lib["mismatched_store"])  # the sample at another tiling
    widget.library_row.set_library(lib["library"])
    _draw_box(v, widget, ref, (400.0, 400.0), (1800.0, 2600.0))
    _search(widget, qtbot)
    [message] = [m for m in messages if "does not fit library" in m]
    assert "\n" not in message and "tiling" in message and "gpfm embed SLIDE" in message
    assert widget.status.text().startswith("Library search failed: the query store")
    assert widget.library_results.gallery.count() == 0

    widget.library_row.set_library(lib["root"])  # a folder that is not a library
    assert any("is not a library" in m for m in messages)

    # Cancelling right away leaves the panel ready, with no error.
    widget.store_row.use_store(lib["sample_store"])
    before = len(messages)
    widget.search_button.click()
    widget.library_results.cancel()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    assert len(messages) == before
    assert not widget.library_results.cancel_button.isEnabled()
    if widget.library_results.last_hits is None:
        assert widget.status.text() == "Library search stopped."


def test_a_hit_on_a_slide_without_pixel_size_opens_at_the_embedding_scale(
        make_napari_viewer_proxy, tmp_path):
    """The file records no um/px; the library knows the one it was embedded at, and the slide
    opens with it (in micrometres like the others), framed on the hit."""
    from napari_gpfm.library import LibraryIndex
    from napari_gpfm.library.query import SearchOptions, search_roi
    from napari_gpfm.napari._gallery_nav import SlideSwitcher, go_to_hit

    built = build_library_with_unscaled_slide(tmp_path)
    reset_sessions()
    v = make_napari_viewer_proxy()
    library = LibraryIndex.open(built["library"])
    store = EmbeddingStore.open(built["unscaled_store"])
    x, y = store.coords[0] + store.tile_size_l0 / 2.0  # a point: the tile under it
    hits = search_roi(library, built["unscaled_store"], (x, y),
                      SearchOptions(top_k=500, include_query=True))
    hit = next(h for h in hits if h.slide_name == "no-mpp.tif")
    layer, view = go_to_hit(v, hit, SlideSwitcher())
    ref = SlideRef.from_layer(layer)
    assert ref.mpp == pytest.approx(NO_MPP_MPP)
    assert ref.scale_yx == pytest.approx((NO_MPP_MPP, NO_MPP_MPP))
    cy, cx = view.center_yx
    (top, left), = ref.level0_to_world(np.array([[hit.x, hit.y]]))
    (bottom, right), = ref.level0_to_world(np.array([[hit.x + hit.w, hit.y + hit.h]]))
    assert left <= cx <= right and top <= cy <= bottom
    reset_sessions()
