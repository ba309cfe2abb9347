"""The npe2 reader and sample data, through a real napari viewer (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_gpfm.napari._reader import get_reader  # noqa: E402


def test_reader_declines_what_it_cannot_read(tmp_path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    assert get_reader(str(empty)) is None  # a .tif may be another plugin's image
    assert get_reader(str(tmp_path / "missing.svs")) is None
    assert get_reader(str(tmp_path)) is None
    assert get_reader("photo.png") is None
    assert get_reader(["a.svs", "b.svs"]) is None


def test_a_broken_scanner_file_gets_its_reason_not_napari_s_generic_error(
    make_napari_viewer_proxy, sample_slide_path, tmp_path
):
    text = tmp_path / "notaslide.svs"
    text.write_text("hello")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(sample_slide_path.read_bytes()[: sample_slide_path.stat().st_size // 3])
    viewer = make_napari_viewer_proxy()
    for path, reason in ((text, "text file, not a TIFF-based slide"),
                         (truncated, "truncated or corrupted")):
        assert get_reader(str(path)) is not None
        # What napari's reader dialog does once the user picks napari-gpfm (before this, the
        # user read "Reader 'napari-gpfm' was selected to open [...], but refused the file").
        with pytest.raises(Exception) as info:
            viewer.open(str(path), plugin="napari-gpfm")
        messages, exc = [], info.value
        while exc is not None:  # napari wraps the reader's error in its own
            messages.append(str(exc))
            exc = exc.__cause__ or exc.__context__
        assert any(reason in m and path.name in m for m in messages), messages
    assert len(viewer.layers) == 0


def test_reader_gives_multiscale_rgb_in_microns(sample_slide_path):
    reader = get_reader(str(sample_slide_path))
    assert reader is not None
    [(data, kwargs, layer_type)] = reader(str(sample_slide_path))
    assert layer_type == "image"
    assert kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["contrast_limits"] == [0, 255]
    assert data[0].shape == (2967, 2220, 3) and data[0].dtype == np.uint8
    assert kwargs["scale"] == pytest.approx((0.499, 0.499), abs=1e-3)
    meta = kwargs["metadata"]["gpfm_slide"]
    assert meta["dimensions"] == [2220, 2967] and meta["vendor"] == "aperio"
    assert len(meta["fingerprint"]) == 64


def test_npe2_manifest_is_valid():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-gpfm")
    assert pm.name == "napari-gpfm"
    assert {r.command for r in pm.contributions.readers} == {"napari-gpfm.get_reader"}


def test_open_sample_in_viewer(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy(show=True)  # a shown window is what GL renders into
    layers = viewer.open_sample("napari-gpfm", "cmu_small_region")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    assert layer.metadata["gpfm_slide"]["vendor"] == "aperio"
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499), abs=1e-3)
    # the viewer really renders the slide: a screenshot shows tissue (pink/purple), not blank
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.shape[2] == 4 and shot[..., :3].std() > 10


def test_open_slide_by_path_uses_our_reader(make_napari_viewer_proxy, sample_slide_path):
    viewer = make_napari_viewer_proxy()
    layers = viewer.open(str(sample_slide_path), plugin="napari-gpfm")
    assert layers[0].data[0].shape == (2967, 2220, 3)


def test_a_corrected_pixel_size_reopens_the_slide(tmp_path):
    """The Embed job opens slides through the reader's cache: a second, different pixel size
    typed for a file that records none must reach the job (it kept the first one)."""
    from slide_factory import he_image, write_pyramid

    from napari_gpfm.napari._reader import _open_cached

    path = write_pyramid(tmp_path / "nompp.tif", he_image(256, 256), levels=1, mpp=None)
    assert _open_cached(path, 0.5).mpp == 0.5
    assert _open_cached(path, 0.25).mpp == 0.25
    assert _open_cached(path).mpp == 0.25  # no value given: the cached slide is reused
