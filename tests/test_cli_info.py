"""`gpfm info`: the human-readable report and `--json`, on real and written slides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from slide_factory import REPO, SAMPLE, SAMPLE_MPP, TCGA_NO_MPP, SlideFiles

from napari_gpfm.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SlideFiles:
    return SlideFiles(tmp_path_factory.mktemp("cli-slides"))


def _info(capsys, *argv: str) -> list[str]:
    assert main(["info", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out.splitlines()


def test_info_on_the_sample(capsys):
    lines = _info(capsys, str(SAMPLE))
    assert lines == [
        f"slide      {SAMPLE}",
        "size       2220 x 2967 px",
        "pixel size 0.4990 x 0.4990 um/px (metadata)",
        "objective  20.0",
        "vendor     aperio",
        "tile       240 x 240 px",
        "level 0    2220 x 2967 px  (downsample 1.000)",
        "associated thumbnail, label, macro",
    ]


def test_info_json_on_the_sample(capsys):
    info = json.loads("\n".join(_info(capsys, str(SAMPLE), "--json")))
    assert (info["width"], info["height"]) == (2220, 2967)
    assert info["mpp_x"] == pytest.approx(SAMPLE_MPP, abs=1e-3)
    assert info["mpp_y"] == pytest.approx(SAMPLE_MPP, abs=1e-3)
    assert info["mpp_source"] == "metadata"
    assert info["vendor"] == "aperio"
    assert info["objective_power"] == 20
    assert info["level_count"] == 1 and info["level_dimensions"] == [[2220, 2967]]
    assert info["associated_images"] == ["thumbnail", "label", "macro"]


def test_info_json_from_a_real_process():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "napari_gpfm.cli", "info", "--json", str(SAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["width"], info["height"], info["vendor"]) == (2220, 2967, "aperio")
    assert info["mpp_x"] == pytest.approx(SAMPLE_MPP, abs=1e-3)


def test_info_on_a_pyramid_lists_every_level(files, capsys):
    lines = _info(capsys, str(files.pyramid))
    assert "pixel size 0.2500 x 0.2500 um/px (metadata)" in lines
    assert "vendor     generic TIFF" in lines
    assert "objective  unknown" in lines
    assert "tile       256 x 256 px" in lines
    assert [ln for ln in lines if ln.startswith("level")] == [
        "level 0    1024 x 768 px  (downsample 1.000)",
        "level 1    512 x 384 px  (downsample 2.000)",
        "level 2    256 x 192 px  (downsample 4.000)",
    ]
    assert not any(ln.startswith("associated") for ln in lines)


def test_info_on_strips_shows_the_strip(files, capsys):
    lines = _info(capsys, str(files.strips))
    assert "tile       3000 x 16 px" in lines
    assert "size       3000 x 1500 px" in lines


def test_info_without_mpp_says_to_pass_it(capsys):
    lines = _info(capsys, str(TCGA_NO_MPP))
    assert "pixel size unknown (pass --mpp)" in lines
    assert "size       4443 x 3567 px" in lines
    info = json.loads("\n".join(_info(capsys, str(TCGA_NO_MPP), "--json")))
    assert info["mpp_x"] is None and info["mpp_source"] is None


def test_info_with_a_given_mpp(capsys):
    lines = _info(capsys, str(TCGA_NO_MPP), "--mpp", "0.5")
    assert "pixel size 0.5000 x 0.5000 um/px (user)" in lines
