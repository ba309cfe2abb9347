"""The Embed dock widget end to end on the real sample with a tiny timm encoder (Xvfb)."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("napari")
# Load Triton (through timm -> torch._dynamo) before any viewer maps Mesa's libLLVM: loaded
# after it, the two LLVMs collide and the process segfaults (see napari/_llvm_guard.py).
import timm  # noqa: E402

from napari_gpfm.embedding.store import EmbeddingStore  # noqa: E402
from napari_gpfm.napari._session import (  # noqa: E402
    OVERLAY_KEY,
    SlideRef,
    reset_sessions,
    session_for,
)

ARCH = "test_vit"  # a real timm ViT: patch 16, 160 px input, 64-d output
MPP, READ = 1.0, 112  # 49 tissue tiles on the sample: a few seconds on a CPU
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / f"{ARCH}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Stores of the bundled sample go to the per-user cache: point it at a temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reset_sessions()
    yield tmp_path / "cache" / "napari-gpfm" / "embeddings"
    reset_sessions()


def _viewer_with_widget(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    [slide] = viewer.open_sample("napari-gpfm", "cmu_small_region")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-gpfm", "Embed")
    return viewer, slide, widget


def _configure(widget, weights, batch_size=4):
    widget.encoder_combo.setCurrentText(f"timm:{ARCH}")
    widget.weights_edit.setText(str(weights))
    widget.mpp_spin.setValue(MPP)
    widget.tile_spin.setValue(READ)
    widget.tissue_spin.setValue(0.5)
    widget.device_combo.setCurrentText("cpu")
    widget.batch_spin.setValue(batch_size)


def _percentile_ms(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def test_embed_cancel_resume_and_tiles_on_the_slide(
    make_napari_viewer_proxy, qtbot, tiny_weights, cache_dir
):
    from qtpy.QtCore import QTimer

    viewer, slide, widget = _viewer_with_widget(make_napari_viewer_proxy)
    ref = SlideRef.from_layer(slide)
    # Defaults: the sample lives inside the package, so its stores go to the user cache.
    assert widget.out_edit.text() == str(cache_dir)
    _configure(widget, tiny_weights)

    # Cancel as soon as the first batch is on disk.
    seen = []

    def on_progress(done, total):
        seen.append((done, total))
        if len(seen) == 2:  # (1: the store opened, 2: the first batch written)
            widget.cancel_button.click()

    widget.progressed.connect(on_progress)

    # Event-loop latency while the worker embeds: a 10 ms timer records how late it fires.
    lateness: list[float] = []
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        lateness.append(max(0.0, now - last[0] - 0.010))
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()

    widget.embed_button.click()
    assert widget.is_running
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    first_done, total = widget.tiles_done, widget.tiles_total
    assert total == 49
    assert 0 < first_done < total, (first_done, total)
    assert "press Embed to resume" in widget.status.text()

    [store_path] = list(cache_dir.glob("CMU-1-Small-Region/*.zarr"))
    store = EmbeddingStore.open(store_path)
    assert store.n_done == first_done and not store.is_complete
    assert not store.lock_path.exists()  # the cancelled run let go of the store

    # The other widgets now find this store for the slide.
    assert session_for(ref).current_store().path == store_path

    # Resume: only the missing tiles are computed.
    seen.clear()
    widget.progressed.disconnect(on_progress)
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    timer.stop()
    result = widget.last_result
    assert result is not None and result.complete
    assert result.skipped == first_done and result.computed == total - first_done
    assert EmbeddingStore.open(store_path).is_complete
    assert widget.status.text().startswith("Done: 49 tiles")

    # Tiles appear on the slide: one green cell per embedded tile, aligned with the slide.
    layer = widget.progress_layer
    assert layer in viewer.layers and layer.rgb
    meta = layer.metadata[OVERLAY_KEY]
    assert meta["slide_fingerprint"] == ref.fingerprint and meta["store"] == str(store_path)
    assert meta["encoder_id"].startswith(f"timm:{ARCH}@") and meta["tiling_id"]
    coords = store.all_coords
    size = float(store.attrs["tile_size_l0"])
    data = np.asarray(layer.data)
    for x, y in coords[[0, len(coords) // 2, -1]]:
        world = ref.level0_to_world(np.array([[x + size / 2, y + size / 2]]))[0]
        r, c = (int(round(v)) for v in layer.world_to_data(world))
        assert tuple(data[r, c]) == (0, 190, 120, 150)
    assert (data[..., 3] > 0).sum() == len(coords)

    p50, p99 = _percentile_ms(lateness, 50), _percentile_ms(lateness, 99)
    print(f"\nevent-loop lateness while embedding: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"({len(lateness)} ticks)")
    assert len(lateness) > 20
    assert p50 < 50.0  # the viewer stays responsive: the encoder runs off the main thread


def test_a_complete_store_is_reused(make_napari_viewer_proxy, qtbot, tiny_weights, cache_dir):
    viewer, _slide, widget = _viewer_with_widget(make_napari_viewer_proxy)
    _configure(widget, tiny_weights, batch_size=64)
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert widget.last_result.computed == 49
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert widget.last_result.computed == 0 and widget.last_result.skipped == 49
    assert widget.status.text().startswith("Already embedded: 49 tiles")  # not "Done: 49 ..."


def test_bad_inputs_are_notifications(make_napari_viewer_proxy, qtbot, tiny_weights, cache_dir,
                                      tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-gpfm", "Embed")
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))

    widget.embed_button.click()  # no slide open
    assert not widget.is_running
    assert any("open a slide first" in m for m in messages)

    viewer.open_sample("napari-gpfm", "cmu_small_region")
    _configure(widget, tmp_path / "missing.safetensors")
    widget.embed_button.click()  # weights file that does not exist
    assert not widget.is_running
    assert any("missing.safetensors not found" in m for m in messages)

    # A weights file of another architecture fails in the worker: still a one-line error.
    other = tmp_path / "other.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, str(other))
    widget.weights_edit.setText(str(other))
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert widget.status.text().startswith("Failed:")
    assert any("other.safetensors" in m for m in messages)

    # A refused start replaces that outcome on the status line; the messages speak of the
    # panel's fields, not of command-line flags.
    widget.weights_edit.setText(str(tmp_path))
    widget.embed_button.click()
    assert widget.status.text().startswith("Refused:") and "is a folder" in messages[-1]
    widget.weights_edit.setText("")
    widget.encoder_combo.setCurrentText("gpfm")
    widget.embed_button.click()
    assert not widget.is_running
    assert "choose its file under Weights" in messages[-1] and "--" not in messages[-1]
    assert widget.status.text() == f"Refused: {messages[-1]}"


def test_a_tiling_without_tiles_is_refused_before_any_store(
    make_napari_viewer_proxy, qtbot, tiny_weights, cache_dir
):
    from napari.utils.notifications import notification_manager

    viewer, slide, widget = _viewer_with_widget(make_napari_viewer_proxy)
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    _configure(widget, tiny_weights)
    widget.tile_spin.setValue(4096)  # 4096 px at 1 um/px: more than the whole slide
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert any("larger than the slide; choose a smaller Tile size" in m for m in messages)
    assert widget.status.text().startswith("Failed:")
    assert session_for(SlideRef.from_layer(slide)).store_path is None  # no empty store chosen
    assert not cache_dir.exists() or not any(cache_dir.rglob("*.zarr"))
    assert len(viewer.layers) == 1  # no progress layer either

    # Cancelled while the encoder loads: the status says so instead of "Stopping...".
    widget.tile_spin.setValue(READ)
    widget.embed_button.click()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert not widget.status.text().startswith("Stopping")


def test_triton_is_kept_out_only_next_to_another_llvm(tmp_path, monkeypatch):
    import sys

    from napari_gpfm.napari._llvm_guard import foreign_llvm_loaded, keep_triton_out

    mesa = tmp_path / "maps-mesa"
    mesa.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    plain = tmp_path / "maps-plain"
    plain.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert foreign_llvm_loaded(mesa) and not foreign_llvm_loaded(plain)
    assert not foreign_llvm_loaded(tmp_path / "no-such-file")

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert keep_triton_out(plain) is False and "triton" not in sys.modules
    assert keep_triton_out(mesa) is True and sys.modules["triton"] is None
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    # Once Triton is loaded (it came first), nothing is changed.
    monkeypatch.setitem(sys.modules, "triton", object())
    assert keep_triton_out(mesa) is False


def test_embeddings_go_beside_the_slide_unless_it_is_the_bundled_sample(
    tmp_path, monkeypatch, sample_slide_path
):
    from napari_gpfm.napari._session import default_output_dir, user_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    slide = tmp_path / "case-12" / "slide.svs"
    slide.parent.mkdir()
    slide.write_bytes(b"")
    assert default_output_dir(slide) == slide.parent / "gpfm-embeddings"
    assert default_output_dir(sample_slide_path) == user_cache_dir()
    assert user_cache_dir() == tmp_path / "cache" / "napari-gpfm" / "embeddings"


def test_slide_pixel_size_resolution_and_output_folder(make_napari_viewer_proxy, qtbot,
                                                       tiny_weights, cache_dir, tmp_path):
    """A slide that records no pixel size is embedded once the user enters it (the error
    names the field, not a command-line flag); a resolution finer than the scan is refused in
    the widget's words; the output folder the user chose survives other slides opening."""
    from napari.utils.notifications import notification_manager
    from slide_factory import OME_CROP, he_image, write_pyramid

    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    path = write_pyramid(tmp_path / "nompp.tif", he_image(640, 640, x=700, y=1900), levels=1,
                         mpp=None)
    viewer = make_napari_viewer_proxy()
    [layer] = viewer.open(str(path), plugin="napari-gpfm")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-gpfm", "Embed")
    _configure(widget, tiny_weights, batch_size=16)
    assert widget.slide_picker.current_ref().path == path
    assert widget.slide_mpp_spin.isEnabled() and widget.slide_mpp_spin.value() == 0

    widget.embed_button.click()
    assert not widget.is_running
    assert any("records no pixel size: enter it under Slide pixel size" in m for m in messages)
    assert not any("--slide-mpp" in m for m in messages)

    widget.slide_mpp_spin.setValue(0.5)
    picker = widget.slide_picker
    viewer.open(str(OME_CROP), plugin="napari-gpfm")
    picker.setCurrentIndex(picker.findText(OME_CROP.name))
    assert not widget.slide_mpp_spin.isEnabled()  # the crop records 0.2271
    picker.setCurrentIndex(picker.findText(path.name))
    assert widget.slide_mpp_spin.value() == 0.5  # what the user entered is kept
    widget.mpp_spin.setValue(0.25)
    widget.embed_button.click()
    assert not widget.is_running
    assert any(m.startswith("Resolution 0.25 µm/px is finer than the slide's own 0.5")
               for m in messages)

    chosen = tmp_path / "my project"
    widget.out_edit.setText(str(chosen))
    viewer.add_points([[10.0, 10.0]])  # the layer list changes, the slide does not...
    assert widget.slide_picker.current_ref().path == path
    assert widget.out_edit.text() == str(chosen)  # ...so the folder the user typed stays

    widget.mpp_spin.setValue(MPP)
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    assert widget.last_result.computed > 0, widget.status.text()
    [store] = chosen.rglob("*.zarr")
    assert EmbeddingStore.open(store).attrs["slide_mpp"] == 0.5


def test_the_encoder_is_checked_when_its_name_is_complete(make_napari_viewer_proxy, qtbot):
    """Typing a name does not look it up at every keystroke (a timm: name imports torch on
    the GUI thread); finishing the edit does."""
    viewer, _slide, widget = _viewer_with_widget(make_napari_viewer_proxy)
    before = widget.encoder_status.text()
    assert before.startswith("✓ weights found")  # the embedded default
    line = widget.encoder_combo.lineEdit()
    line.clear()
    qtbot.keyClicks(line, "no-such-enc")
    assert widget.encoder_status.text() == before
    line.editingFinished.emit()
    assert "no-such-enc" in widget.encoder_status.text()
    assert widget.encoder_status.text().startswith("⚠")


def test_other_widgets_say_which_store_a_new_run_switched_to(make_napari_viewer_proxy, qtbot,
                                                            tiny_weights, cache_dir):
    """An Embed run of another tiling makes the widgets use its store; their store line says
    so (it kept naming the previous store while Maps computed on the new one)."""
    viewer, slide, widget = _viewer_with_widget(make_napari_viewer_proxy)
    _dock, maps = viewer.window.add_plugin_dock_widget("napari-gpfm", "Maps")
    _configure(widget, tiny_weights, batch_size=64)
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    first = session_for(SlideRef.from_layer(slide)).store_path
    assert maps.store_row.label.toolTip() == str(first)
    maps.k_spin.setValue(2)
    maps.cluster_button.click()
    qtbot.waitUntil(lambda: not maps.is_busy, timeout=TIMEOUT_MS)
    assert maps.cluster_table.rowCount() == 2

    widget.tile_spin.setValue(READ * 2)
    widget.embed_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT_MS)
    second = session_for(SlideRef.from_layer(slide)).store_path
    assert second != first
    assert maps.store_row.label.toolTip() == str(second)
    assert f"{widget.last_result.total} tiles (complete)" in maps.store_row.label.text()
    assert maps.cluster_table.rowCount() == 0  # it described the previous store
