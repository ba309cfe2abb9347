"""npe2 sample data: the bundled real H&E slide."""

from __future__ import annotations

from napari_gpfm.data.sample import sample_slide_path
from napari_gpfm.napari._reader import read_slide


def cmu_small_region() -> list[tuple]:
    """CMU-1-Small-Region: Aperio H&E of skin, 2220 x 2967 px at 0.499 um/px (CC0)."""
    return read_slide(sample_slide_path())
