"""Maps, Similar regions and ROI classifier widgets end to end on the real sample (Xvfb).

The sample is embedded once per module with a tiny timm ViT (random weights written here) at
a coarse tiling; the widgets then find that store through the per-user cache folder, exactly
as after an Embed run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")
# Load Triton (through timm -> torch._dynamo) before any viewer maps Mesa's libLLVM: loaded
# after it, the two LLVMs collide and the process segfaults (see napari/_llvm_guard.py).
import timm  # noqa: E402

from napari_gpfm.napari._session import (  # noqa: E402
    OVERLAY_KEY,
    TILES_KEY,
    SlideRef,
    reset_sessions,
)

ARCH = "test_vit"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, sample_slide_path):
    """(cache root, store path, features, coords, tile size) of the embedded sample."""
    import torch
    from safetensors.torch import save_file

    from napari_gpfm.embedding import default_store_path
    from napari_gpfm.embedding.engine import embed_slide, prepare_store
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.napari._session import user_cache_dir
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    root = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    weights = root / f"{ARCH}.safetensors"
    model = timm.create_model(ARCH, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    encoder = load_encoder(f"timm:{ARCH}", weights=weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        out_dir = user_cache_dir()
    with open_slide(sample_slide_path) as slide:
        spec = TilingSpec(mpp=1.0, read_size=112, model_size=160)
        grid = make_grid(slide, spec)
        store_path = default_store_path(out_dir, slide, encoder.spec.name, spec)
        store = prepare_store(store_path, slide=slide, grid=grid, encoder=encoder, spec=spec)
        embed_slide(slide, grid, encoder, store, device="cpu", batch_size=64, num_workers=1)
    return {
        "root": root,
        "store": store_path,
        "features": store.features,
        "coords": store.coords,
        "size": store.tile_size_l0,
        "encoder_id": encoder.encoder_id,
        "tiling_id": spec.id,
    }


@pytest.fixture
def viewer(make_napari_viewer_proxy, embedded, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(embedded["root"]))
    reset_sessions()
    v = make_napari_viewer_proxy()
    [slide] = v.open_sample("napari-gpfm", "cmu_small_region")
    yield v, SlideRef.from_layer(slide)
    reset_sessions()


def _layer(viewer, suffix):
    return next(lay for lay in viewer.layers if lay.name.endswith(suffix))


def _value_at_tile(layer, ref, xy, size):
    """The layer's data under the centre of the tile whose level-0 top-left is ``xy``."""
    world = ref.level0_to_world(np.array([[xy[0] + size / 2, xy[1] + size / 2]]))[0]
    r, c = (int(round(v)) for v in layer.world_to_data(world))
    return np.asarray(layer.data)[r, c]


def _normed(features):
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _check_provenance(layer, ref, embedded):
    meta = layer.metadata[OVERLAY_KEY]
    assert meta["slide_path"] == str(ref.path)
    assert meta["slide_fingerprint"] == ref.fingerprint
    assert meta["encoder_id"] == embedded["encoder_id"]
    assert meta["tiling_id"] == embedded["tiling_id"]
    assert meta["store"] == str(embedded["store"])


# ----------------------------------------------------------------------------- Maps
def test_maps_pca_clusters_and_scores(viewer, embedded, qtbot, messages):
    from napari_gpfm.analysis.maps import pca_rgb

    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "Maps")
    assert "test_vit" in widget.store_row.label.text()  # found in the cache, like after Embed
    feats, coords, size = embedded["features"], embedded["coords"], embedded["size"]

    widget.show_score()  # nothing computed yet: a notification, not a traceback
    assert any("no score to show yet" in m for m in messages)

    widget.pca_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    pca = _layer(v, "· PCA colours")
    assert pca.rgb and pca.opacity == pytest.approx(0.7)
    _check_provenance(pca, ref, embedded)
    expected = np.rint(pca_rgb(feats) * 255).astype(int)
    for i in (0, len(coords) // 2, len(coords) - 1):
        rgba = _value_at_tile(pca, ref, coords[i], size)
        assert rgba[3] == 255 and np.abs(rgba[:3].astype(int) - expected[i]).max() <= 1
    # background far from tissue stays transparent
    assert _value_at_tile(pca, ref, (0, 0), size)[3] == 0

    widget.k_spin.setValue(3)
    widget.cluster_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    clusters = _layer(v, "· clusters")
    assert clusters.opacity == pytest.approx(0.5)
    _check_provenance(clusters, ref, embedded)
    labels = widget.last_clusters.labels
    for i in range(0, len(coords), 7):
        assert _value_at_tile(clusters, ref, coords[i], size) == labels[i] + 1
    table = widget.cluster_table
    assert table.rowCount() == 3
    counts = [int(table.item(r, 1).text()) for r in range(3)]
    assert sum(counts) == len(coords) and counts == sorted(counts, reverse=True)
    tile_mm2 = (size * 0.499 / 1000.0) ** 2
    area = float(table.item(0, 2).text())
    assert area == pytest.approx(counts[0] * tile_mm2, rel=2e-3)
    assert table.item(0, 0).background().color().name() == clusters.metadata[TILES_KEY][
        "colours"][0]


def test_reruns_update_hidden_result_layers_in_place(viewer, embedded, qtbot):
    """A rerun gives the existing layer the new result, hidden or not, instead of removing it
    and adding a new one: napari on Mesa's llvmpipe (any machine without a GPU driver) can
    segfault when a hidden layer is removed (seen with the Embed widget's progress layer)."""
    v, ref = viewer
    v.window._qt_window.show()
    _dock, maps = v.window.add_plugin_dock_widget("napari-gpfm", "Maps")
    _dock, similar = v.window.add_plugin_dock_widget("napari-gpfm", "Similar regions")
    coords, size = embedded["coords"], embedded["size"]
    maps.k_spin.setValue(3)
    maps.cluster_button.click()
    qtbot.waitUntil(lambda: not maps.is_busy, timeout=TIMEOUT_MS)
    similar.box_button.click()
    box, _inside = _query_box(ref, coords, size, [0, 1])
    v.layers["similarity query"].add_rectangles(box)
    similar.k_spin.setValue(5)
    similar.search_button.click()
    clusters, boxes = _layer(v, "· clusters"), _layer(v, "· similar tiles")
    count = len(v.layers)
    qtbot.wait(300)
    clusters.visible = boxes.visible = False
    qtbot.wait(300)

    maps.k_spin.setValue(4)
    maps.cluster_button.click()
    qtbot.waitUntil(lambda: not maps.is_busy, timeout=TIMEOUT_MS)
    similar.k_spin.setValue(3)
    similar.search_button.click()
    qtbot.wait(300)
    assert _layer(v, "· clusters") is clusters and _layer(v, "· similar tiles") is boxes
    assert len(v.layers) == count and not clusters.visible and not boxes.visible
    labels = maps.last_clusters.labels
    assert labels.max() == 3 and clusters.metadata[TILES_KEY]["class_names"][3]
    for i in range(0, len(coords), 5):
        assert _value_at_tile(clusters, ref, coords[i], size) == labels[i] + 1
    assert len(boxes.data) == 3 and list(boxes.features["rank"]) == [1, 2, 3]
    np.testing.assert_allclose(boxes.features["score"], similar.last_result.scores)


# ----------------------------------------------------------------------------- Similar
def _query_box(ref, coords, size, rows):
    """A data-space rectangle (for a layer over the slide) around the tiles ``rows``."""
    xy = coords[rows]
    lo = xy.min(axis=0) + size * 0.25
    hi = xy.max(axis=0) + size * 0.75
    corners = ref.level0_to_data(np.array([lo, hi]))
    return corners, {int(r) for r in rows}


def test_similar_regions_box_point_and_table(viewer, embedded, qtbot, messages):
    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "Similar regions")
    feats, coords, size = embedded["features"], embedded["coords"], embedded["size"]

    widget.search_button.click()  # no query drawn yet
    assert any("no query yet" in m for m in messages)

    widget.box_button.click()
    query = v.layers["similarity query"]
    assert query.mode == "add_rectangle"
    # tiles 0 and 1 are side by side in the first tissue row
    assert coords[1][1] == coords[0][1]
    box, inside = _query_box(ref, coords, size, [0, 1])
    query.add_rectangles(box)
    widget.k_spin.setValue(5)
    widget.search_button.click()

    result = widget.last_result
    assert set(result.query_indices.tolist()) == inside
    assert len(result) == 5 and not inside & set(result.indices.tolist())
    assert np.all(np.diff(result.scores) <= 0)
    # an independent cosine similarity: mean of the normalised query tiles, renormalised
    normed = _normed(feats.astype(np.float64))
    q = normed[sorted(inside)].mean(axis=0)
    q /= np.linalg.norm(q)
    expected = normed @ q
    np.testing.assert_allclose(result.scores, np.sort(expected[~np.isin(
        np.arange(len(feats)), sorted(inside))])[::-1][:5], atol=1e-4)

    heat = _layer(v, "· similarity")
    _check_provenance(heat, ref, embedded)
    assert heat.metadata[OVERLAY_KEY]["query_tiles"] == sorted(inside)
    for i in (0, 5, len(coords) - 1):
        assert _value_at_tile(heat, ref, coords[i], size) == pytest.approx(expected[i], abs=1e-4)

    boxes = _layer(v, "· similar tiles")
    _check_provenance(boxes, ref, embedded)
    assert list(boxes.features["rank"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(boxes.features["score"], result.scores)
    # each rectangle covers its tile exactly, in world micrometres
    for k, tile in enumerate(result.indices):
        corners = np.array([boxes.data_to_world(p) for p in boxes.data[k]])
        x, y = coords[tile]
        top_left = ref.level0_to_world(np.array([[x, y]]))[0]
        bottom_right = ref.level0_to_world(np.array([[x + size, y + size]]))[0]
        np.testing.assert_allclose(corners.min(axis=0), top_left, atol=1e-3)
        np.testing.assert_allclose(corners.max(axis=0), bottom_right, atol=1e-3)
    edge = np.asarray(boxes.edge_color)
    assert not np.allclose(edge[0], edge[-1])  # coloured by score

    table = widget.table
    assert table.rowCount() == 5
    assert table.item(0, 2).text() == str(int(coords[result.indices[0]][0]))
    table.cellClicked.emit(2, 0)
    x, y = coords[result.indices[2]]
    centre = ref.level0_to_world(np.array([[x + size / 2, y + size / 2]]))[0]
    camera = v.scene.camera
    np.testing.assert_allclose(camera.center[-2:], centre, atol=1e-3)
    tile_px = size * ref.scale_yx[1] * camera.zoom  # the tile's width on screen
    assert tile_px == pytest.approx(min(v.canvas.size) / 6, rel=1e-3)

    # Keeping the query's own tiles: the best match is a query tile, at similarity ~1.
    widget.exclude_check.setChecked(False)
    widget.k_spin.setValue(1)
    widget.search_button.click()
    assert int(widget.last_result.indices[0]) in inside

    # The Maps widget can show this score with another colour map.
    _dock, maps = v.window.add_plugin_dock_widget("napari-gpfm", "Maps")
    maps.refresh_scores()
    assert maps.score_combo.currentText() == "similarity to query"
    maps.cmap_combo.setCurrentText("viridis")
    maps.score_button.click()
    shown = _layer(v, "· similarity to query · score map")
    assert shown.colormap.name == "viridis" and shown.colorbar.visible  # a colour is a value
    assert _value_at_tile(shown, ref, coords[3], size) == pytest.approx(
        _value_at_tile(heat, ref, coords[3], size))

    # A clicked point selects the nearest tile.
    widget.point_button.click()
    points = v.layers["similarity query points"]
    assert points.mode == "add"
    x, y = coords[10]
    points.add(ref.level0_to_data(np.array([[x + size / 2, y + size / 2]])))
    widget.search_button.click()
    assert widget.last_result.query_indices.tolist() == [10]


def test_similar_bad_inputs_are_notifications(viewer, embedded, qtbot, messages, tmp_path,
                                              monkeypatch):
    from slide_factory import he_image, write_pyramid

    from napari_gpfm.embedding.store import EmbeddingStore
    from napari_gpfm.napari._session import reset_sessions
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "Similar regions")
    widget.box_button.click()
    query = v.layers["similarity query"]

    # An ROI on the glass (top-left corner of the sample is background).
    query.add_rectangles(ref.level0_to_data(np.array([[5.0, 5.0], [150.0, 150.0]])))
    widget.search_button.click()
    assert any("holds no embedded tissue tile" in m for m in messages)
    assert widget.status.text() == f"Refused: {messages[-1]}"  # not an earlier outcome

    # A store made from another slide.
    other = write_pyramid(tmp_path / "other.tif", he_image(768, 768), levels=1, mpp=1.0)
    with open_slide(other) as slide:
        spec = TilingSpec(mpp=2.0, read_size=64, model_size=160)
        store = EmbeddingStore.create(
            tmp_path / "other.zarr", slide=slide, grid=make_grid(slide, spec),
            encoder_meta={"encoder_id": "x@0", "encoder_name": "x", "weights_sha256": "0" * 64,
                          "embed_dim": 8},
            spec=spec,
        )
    widget.store_row.use_store(store.path)
    assert any("was made from another slide" in m for m in messages)

    # No embeddings at all for the slide.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    reset_sessions()
    widget.store_row.refresh()
    assert "none yet" in widget.store_row.label.text()
    widget.search_button.click()
    assert any("embed this slide first" in m for m in messages)


# ----------------------------------------------------------------------------- classifier
def _regions(ref, coords, size):
    """Two labelled rectangles: the first two tissue rows vs the last two (data coords)."""
    ys = np.unique(coords[:, 1])
    top = coords[np.isin(coords[:, 1], ys[:2])]
    bottom = coords[np.isin(coords[:, 1], ys[-2:])]
    out = []
    for group in (top, bottom):
        lo = group.min(axis=0) + size * 0.1
        hi = group.max(axis=0) + size * 0.9
        out.append(ref.level0_to_data(np.array([lo, hi])))
    return out, len(top), len(bottom)


def test_classifier_train_map_save_load_export(viewer, embedded, qtbot, messages, tmp_path):
    from napari_gpfm.analysis.classify import LinearProbe
    from napari_gpfm.analysis.geojson import read_geojson

    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "ROI classifier")
    feats, coords, size = embedded["features"], embedded["coords"], embedded["size"]

    widget.train_button.click()  # nothing drawn yet
    assert any("no labelled regions yet" in m for m in messages)
    widget.rect_button.click()  # no class picked yet
    assert any("add or pick a class first" in m for m in messages)

    (top, bottom), n_top, n_bottom = _regions(ref, coords, size)
    widget.add_class("upper dermis")
    widget.rect_button.click()
    layer = v.layers["training regions"]
    assert layer.mode == "add_rectangle"
    layer.add_rectangles(top)
    widget.add_class("lower dermis")
    layer.add_rectangles(bottom)
    assert list(layer.features["class"]) == ["upper dermis", "lower dermis"]
    colours = [widget.class_colours[n] for n in ("upper dermis", "lower dermis")]
    assert np.asarray(layer.edge_color)[1][:3] == pytest.approx(
        [int(colours[1][i:i + 2], 16) / 255 for i in (1, 3, 5)], abs=1e-3)

    widget.prob_check.setChecked(True)
    widget.train_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    probe = widget.probe
    assert probe.class_names == ["upper dermis", "lower dermis"]
    assert probe.train_counts == {"upper dermis": n_top, "lower dermis": n_bottom}
    assert "Cross-validated accuracy" in widget.cv_label.text()
    classes = _layer(v, "· tissue classes")
    _check_provenance(classes, ref, embedded)
    pred = widget.predicted
    np.testing.assert_array_equal(pred, probe.predict(feats))
    for i in range(0, len(coords), 5):
        assert _value_at_tile(classes, ref, coords[i], size) == pred[i] + 1
    prob = _layer(v, "· p(lower dermis)")
    assert tuple(prob.contrast_limits) == (0.0, 1.0)
    table = widget.area_table
    assert [table.item(r, 0).text() for r in range(2)] == ["upper dermis", "lower dermis"]
    assert sum(int(table.item(r, 1).text()) for r in range(2)) == len(coords)

    # Save, then load: the same predictions.
    saved = tmp_path / "probe.npz"
    widget.save_classifier(saved)
    assert saved.is_file()
    widget.load_classifier(saved)
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(widget.predicted, pred)

    # A classifier made for another encoder is refused with a clear message.
    other = LinearProbe(encoder_id="uni@123456789abc", tiling_id=embedded["tiling_id"])
    other.fit(feats, np.where(np.arange(len(feats)) % 2 == 0, "a", "b"))
    other.save(tmp_path / "other.npz")
    widget.load_classifier(tmp_path / "other.npz")
    assert any("trained on encoder 'uni@123456789abc'" in m for m in messages)

    # Export for QuPath: every tile with its class and probabilities, at level-0 pixels.
    out = widget.export_predictions(tmp_path / "map.geojson")
    tiles = read_geojson(out)
    assert len(tiles) == len(coords)
    assert {t.class_name for t in tiles} <= {"upper dermis", "lower dermis"}
    first = tiles[0]
    np.testing.assert_allclose(first.polygon.min(axis=0), coords[0])
    assert first.object_type == "tile"
    assert first.measurements["p(upper dermis)"] == pytest.approx(widget.probabilities[0, 0])
    doc = json.loads(out.read_text())
    assert doc["properties"]["gpfm"]["slide"]["fingerprint"] == ref.fingerprint
    assert doc["properties"]["gpfm"]["made_by"]["encoder_id"] == embedded["encoder_id"]

    # Read back, the exported tiles are predictions: never picked (or offered) as training
    # regions, else the next Train would learn the classifier's own answers.
    [read_back] = v.open(str(out), plugin="napari-gpfm")
    assert "class" in read_back.features.columns and len(read_back.data) == len(coords)
    items = [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    assert read_back.name not in items and widget.layer_combo.currentText() == "training regions"
    widget.train_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    assert widget.probe.train_counts == {"upper dermis": n_top, "lower dermis": n_bottom}


def test_classifier_needs_tissue_and_two_classes(viewer, embedded, qtbot, messages):
    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "ROI classifier")
    coords, size = embedded["coords"], embedded["size"]
    (top, _bottom), _, _ = _regions(ref, coords, size)
    widget.add_class("tissue")
    widget.rect_button.click()
    layer = v.layers["training regions"]
    layer.add_rectangles(top)
    widget.train_button.click()
    assert any("at least 2 classes" in m for m in messages)
    widget.add_class("glass")
    layer.add_rectangles(ref.level0_to_data(np.array([[5.0, 5.0], [150.0, 150.0]])))
    widget.train_button.click()
    assert any("at least 2 classes with embedded tiles in their regions; only 'tissue' has "
               "them" in m and "left out 'glass'" in m for m in messages)
    assert not widget.is_busy


def test_classifier_leaves_out_empty_and_removed_classes_and_retires_their_maps(
        viewer, embedded, qtbot):
    """Background regions (no embedded tile) are left out, not fatal; a class removed from
    the list is ignored on the next training; probability maps follow the current classifier
    (kept current when shown, renamed when their class is gone) and so do the Maps scores."""
    from napari_gpfm.napari._session import session_for

    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "ROI classifier")
    coords, size = embedded["coords"], embedded["size"]
    (top, bottom), _, _ = _regions(ref, coords, size)
    ys = np.unique(coords[:, 1])
    middle = coords[np.isin(coords[:, 1], ys[len(ys) // 2 - 1: len(ys) // 2 + 1])]
    middle_box = ref.level0_to_data(np.array([middle.min(axis=0) + size * 0.1,
                                              middle.max(axis=0) + size * 0.9]))
    glass_box = ref.level0_to_data(np.array([[5.0, 5.0], [150.0, 150.0]]))
    for name, box in (("upper", top), ("lower", bottom), ("middle", middle_box),
                      ("glass", glass_box)):
        widget.add_class(name)
        widget.rect_button.click()
        v.layers["training regions"].add_rectangles(box)
    widget.prob_check.setChecked(True)
    widget.train_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    assert widget.probe.class_names == ["upper", "lower", "middle"]
    assert "left out 'glass'" in widget.status.text()
    assert {f"p({n})" for n in ("upper", "lower", "middle")} <= set(session_for(ref).scores)

    widget.class_list.setCurrentRow(widget.class_names.index("middle"))
    widget.remove_class_button.click()
    widget.prob_check.setChecked(False)
    widget.train_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    assert widget.probe.class_names == ["upper", "lower"]
    assert "ignored the regions of 'middle'" in widget.status.text()
    upper = _layer(v, "· p(upper)")  # shown before, so updated though the box is unticked
    for i in range(0, len(coords), 5):
        assert _value_at_tile(upper, ref, coords[i], size) == pytest.approx(
            widget.probabilities[i, 0], abs=1e-6)
    assert _layer(v, "· p(middle) · previous classifier")
    assert not any(lay.name.endswith("· p(middle)") for lay in v.layers)
    scores = session_for(ref).scores
    assert "p(middle)" not in scores and {"p(upper)", "p(lower)"} <= set(scores)


def test_removing_the_last_class_stops_drawing_with_it(viewer, embedded, qtbot):
    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "ROI classifier")
    widget.add_class("tumour")
    widget.rect_button.click()
    layer = v.layers["training regions"]
    assert str(layer.mode) == "add_rectangle"
    assert layer.feature_defaults["class"].iloc[0] == "tumour"
    widget.class_list.setCurrentRow(0)
    widget.remove_class_button.click()
    assert widget.class_names == []
    # No class is left to give: drawing stops, and a shape added anyway gets no class (left
    # out at training) rather than the removed one.
    assert str(layer.mode) == "pan_zoom"
    layer.add_rectangles(ref.level0_to_data(np.array([[400.0, 400.0], [600.0, 600.0]])))
    assert layer.features["class"].iloc[-1] == ""


def test_cluster_table_follows_the_slide_and_an_all_covering_query_explains_itself(
        viewer, embedded, qtbot):
    from slide_factory import OME_CROP

    v, ref = viewer
    _dock, maps = v.window.add_plugin_dock_widget("napari-gpfm", "Maps")
    maps.k_spin.setValue(3)
    maps.cluster_button.click()
    qtbot.waitUntil(lambda: not maps.is_busy, timeout=TIMEOUT_MS)
    assert maps.cluster_table.rowCount() == 3
    v.open(str(OME_CROP), plugin="napari-gpfm")  # a layer-list change: the table stays
    assert maps.slide_picker.current_ref().fingerprint == ref.fingerprint
    assert maps.cluster_table.rowCount() == 3
    maps.slide_picker.setCurrentIndex(maps.slide_picker.findText(OME_CROP.name))
    assert maps.slide_picker.current_ref().fingerprint != ref.fingerprint
    assert maps.cluster_table.rowCount() == 0 and maps.last_clusters is None

    _dock, similar = v.window.add_plugin_dock_widget("napari-gpfm", "Similar regions")
    similar.slide_picker.setCurrentIndex(similar.slide_picker.findText(ref.name))
    similar.box_button.click()
    box, _inside = _query_box(ref, embedded["coords"], embedded["size"], [0, 1])
    query = v.layers["similarity query"]
    query.add_rectangles(box)
    similar.search_button.click()
    boxes = _layer(v, "· similar tiles")
    assert len(boxes.data) == len(similar.last_result) > 0
    query.data = []  # the next query covers the whole slide: no tile is left to show
    w, h = ref.dims
    query.add_rectangles(ref.level0_to_data(np.array([[0, 0], [w, h]])))
    similar.search_button.click()
    assert len(similar.last_result) == 0 and len(boxes.data) == 0
    assert _layer(v, "· similar tiles") is boxes
    assert "untick 'Leave out the query's own tiles'" in similar.status.text()


def test_the_repository_labels_train_from_the_reader(viewer, embedded, qtbot, messages):
    """data/labels/cmu1_regions.geojson read into the viewer becomes the training layer (a
    'training regions' layer already exists) and trains, its glass-only background left out."""
    from pathlib import Path

    v, ref = viewer
    _dock, widget = v.window.add_plugin_dock_widget("napari-gpfm", "ROI classifier")
    widget.new_regions_layer()
    labels = Path(__file__).resolve().parents[1] / "data" / "labels" / "cmu1_regions.geojson"
    [layer] = v.open(str(labels), plugin="napari-gpfm")
    assert widget.layer_combo.currentText() == layer.name
    widget.train_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=TIMEOUT_MS)
    assert widget.probe is not None, messages
    assert {"dermis", "epidermis"} <= set(widget.probe.class_names)
    assert "background" not in widget.probe.class_names
    assert "left out 'background'" in widget.status.text()


# ----------------------------------------------------------------------------- two slides
def test_two_slides_keep_their_own_regions_queries_and_results(
        viewer, embedded, qtbot, extra_he_dir):
    """Regions, queries and maps stay with the slide they were made for; a map of a slide
    hidden by a library jump brings that slide back; maps are named after the slide layer."""
    from napari_gpfm.napari._slide_view import layer_slide_fingerprint, switcher_for

    v, ref = viewer
    cmu = v.layers[ref.name]
    [os1] = v.open(str(extra_he_dir / "openslide_os1_crop" / "OS-1-detail.ome.tif"),
                   plugin="napari-gpfm")
    os1_ref = SlideRef.from_layer(os1)
    _dock, classifier = v.window.add_plugin_dock_widget("napari-gpfm", "ROI classifier")
    _dock, maps = v.window.add_plugin_dock_widget("napari-gpfm", "Maps")
    _dock, similar = v.window.add_plugin_dock_widget("napari-gpfm", "Similar regions")

    def pick(widget, layer):
        widget.slide_picker.setCurrentIndex(widget.slide_picker.findText(layer.name))

    # Regions drawn on the sample are not offered, nor used, for OS-1.
    pick(classifier, cmu)
    classifier.add_class("a")
    classifier.rect_button.click()
    cmu_regions = v.layers["training regions"]
    assert layer_slide_fingerprint(cmu_regions) == ref.fingerprint
    pick(classifier, os1)
    items = [classifier.layer_combo.itemText(i) for i in range(classifier.layer_combo.count())]
    assert cmu_regions.name not in items
    classifier.rect_button.click()  # drawing on OS-1 makes OS-1's own regions layer
    os1_regions = v.layers.selection.active
    assert os1_regions is not cmu_regions
    assert layer_slide_fingerprint(os1_regions) == os1_ref.fingerprint
    classifier.train_button.click()  # OS-1 is not embedded: refused on the panel's line
    assert classifier.status.text().startswith("Refused: no embeddings for OS-1-detail")

    # The same for query layers.
    pick(similar, cmu)
    similar.box_button.click()
    cmu_query = v.layers["similarity query"]
    pick(similar, os1)
    assert similar.query_combo.findText(cmu_query.name) == -1
    similar.box_button.click()
    assert layer_slide_fingerprint(v.layers.selection.active) == os1_ref.fingerprint

    # Maps refuses on its status line, not only in a notification.
    pick(maps, os1)
    maps.pca_button.click()
    assert maps.status.text().startswith("Refused: no embeddings for OS-1-detail")

    # A library jump showed OS-1 and hid the sample; a map of the sample shows the sample
    # again (and hides OS-1), named after the slide layer as the user renamed it.
    switcher_for(v).show(v, os1)
    assert not cmu.visible and not cmu_regions.visible
    cmu.name = "sample"
    pick(maps, cmu)
    maps.pca_button.click()
    qtbot.waitUntil(lambda: not maps.is_busy, timeout=TIMEOUT_MS)
    pca = v.layers["sample · PCA colours"]
    assert cmu.visible and pca.visible and cmu_regions.visible and not os1.visible


def test_a_result_for_a_closed_slide_is_refused(viewer, embedded):
    from napari_gpfm.errors import ParameterError
    from napari_gpfm.napari._overlays import rgb_layer
    from napari_gpfm.napari._session import session_for
    from napari_gpfm.napari._slide_view import place_result

    v, ref = viewer
    tiles = session_for(ref).tiles()
    data = rgb_layer(tiles, np.zeros((len(tiles), 3)), "late map", "pca")
    v.layers.remove(v.layers[ref.name])  # closed while the map was computing
    with pytest.raises(ParameterError, match="was closed before its result"):
        place_result(v, data)
    assert "late map" not in v.layers
