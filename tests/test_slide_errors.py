"""Every bad slide input fails with one readable line, from Python and from `gpfm info`.

NDPI cannot be written by any library here (it is a Hamamatsu format), so it is tested only
through its error path: a non-TIFF file named ``.ndpi``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from slide_factory import REPO, SAMPLE, TCGA_NO_MPP, SlideFiles, box_downsample

from napari_gpfm.cli import main
from napari_gpfm.errors import GPFMError, ParameterError, SlideError
from napari_gpfm.slides import open_slide


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SlideFiles:
    return SlideFiles(tmp_path_factory.mktemp("bad-slides"))


# (attribute of SlideFiles, words the message must hold: what is wrong and what to do)
BAD_FILES = [
    ("missing", ["not found", "check the path"]),
    ("directory", ["is a directory", "pass a .svs/.tif/.ndpi file"]),
    ("empty", ["is empty (0 bytes)", "incomplete"]),
    ("truncated", ["truncated", "copy or download it again"]),
    ("truncated_pyramid", ["truncated", "pyramid level", "copy or download it again"]),
    ("png_as_svs", ["a PNG image", "not a TIFF-based slide", "Aperio SVS"]),
    ("text_as_svs", ["a text file", "not a TIFF-based slide"]),
    ("jpeg_as_ndpi", ["a JPEG image", "not a TIFF-based slide", "NDPI"]),
    ("garbage_tiff", ["corrupted", "copy or download it again"]),
    ("huge_flat", ["20000 x 20000", "untiled", "tiled pyramid", "vips tiffsave"]),
    ("uint16", ["uint16", "16-bit", "convert it to 8-bit RGB"]),
    ("fluorescence", ["multi-channel", "not a brightfield RGB slide"]),
    ("zstack", ["not a layout", "convert it to a tiled pyramidal RGB TIFF"]),
]


def _one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize(("kind", "words"), BAD_FILES, ids=[k for k, _ in BAD_FILES])
def test_bad_file_raises_one_clear_slide_error(files, kind, words):
    path = getattr(files, kind)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    message = str(err.value)
    _one_line(message)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(("kind", "words"), BAD_FILES, ids=[k for k, _ in BAD_FILES])
def test_gpfm_info_on_bad_file_prints_one_error_line(files, kind, words, capsys):
    path = getattr(files, kind)
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # nothing else: no tifffile log lines, no traceback
    assert lines[0].startswith("error: ") and str(path) in lines[0]
    assert words[0] in lines[0]


def test_truncated_slide_from_a_real_process(files):
    """The installed entry point path: exit code 2, one stderr line, nothing logged."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "napari_gpfm.cli", "info", str(files.truncated)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "truncated" in proc.stderr


def test_mpp_missing_says_how_to_pass_it(files):
    with open_slide(files.no_mpp) as slide:
        assert not slide.has_mpp
        with pytest.raises(SlideError) as err:
            _ = slide.mpp
    message = str(err.value)
    _one_line(message)
    assert str(files.no_mpp) in message
    assert "mpp=" in message and "--mpp" in message
    with open_slide(files.no_mpp, mpp=0.25) as slide:
        assert slide.mpp == 0.25


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), 1000, "0.5", True])
def test_given_mpp_out_of_range_is_refused(bad):
    with pytest.raises(ParameterError) as err:
        open_slide(SAMPLE, mpp=bad)
    message = str(err.value)
    _one_line(message)
    assert f"mpp={bad!r}" in message and SAMPLE.name in message and "0.01" in message


def test_given_mpp_accepts_numpy_numbers():
    with open_slide(TCGA_NO_MPP, mpp=np.float32(0.5)) as slide:
        assert slide.mpp == pytest.approx(0.5)


def test_gpfm_info_bad_mpp_is_one_error_line(capsys):
    assert main(["info", str(SAMPLE), "--mpp", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: mpp=0.0")


def test_errors_are_gpfm_errors():
    assert issubclass(SlideError, GPFMError) and issubclass(ParameterError, GPFMError)


# ---------------------------------------------------------------------- handled layouts
def test_rgba_is_composited_on_white(files):
    rgba = files.rgba_image.astype(np.int64)
    alpha = rgba[..., 3:4]
    expected = ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    with open_slide(files.rgba) as slide:
        assert slide.info()["channels"] == 4
        got = slide.read_region((0, 0), 0, slide.dimensions)
        assert got.shape == (600, 700, 3)
        np.testing.assert_array_equal(got, expected)
        assert (got[:50] == 255).all()  # transparent: glass
        np.testing.assert_array_equal(got[-50:], files.rgba_image[-50:, :, :3])  # opaque
        level0 = slide.levels[0]
        assert level0.shape == (600, 700, 3) and level0.chunks[2] == (3,)
        np.testing.assert_array_equal(level0.compute(), expected)
        level1 = slide.read_region((0, 0), 1, (350, 300))
        rgba1 = box_downsample(files.rgba_image, 2).astype(np.int64)
        a1 = rgba1[..., 3:4]
        np.testing.assert_array_equal(
            level1, ((rgba1[..., :3] * a1 + 255 * (255 - a1) + 127) // 255).astype(np.uint8)
        )


def test_grayscale_is_replicated_to_rgb(files):
    gray = files.gray_image
    with open_slide(files.gray) as slide:
        assert slide.info()["channels"] == 1
        got = slide.read_region((100, 50), 0, (300, 200))
        assert got.shape == (200, 300, 3)
        for c in range(3):
            np.testing.assert_array_equal(got[..., c], gray[50:250, 100:400])
        levels = slide.levels
        assert [lv.shape for lv in levels] == [(600, 700, 3), (300, 350, 3)]
        np.testing.assert_array_equal(levels[1].compute()[..., 2], box_downsample(gray, 2))
        assert slide.thumbnail(350).shape == (300, 350, 3)
