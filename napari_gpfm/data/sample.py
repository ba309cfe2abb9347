"""The bundled sample slide: CMU-1-Small-Region, a real Aperio H&E (OpenSlide test data, CC0).

2220 x 2967 px at 0.499 um/px (20x), skin with epidermis and dermis. Used by `gpfm demo`,
the napari sample data, the tests and the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_SLIDE_NAME = "CMU-1-Small-Region.svs"


def sample_slide_path() -> Path:
    """Path of the bundled sample slide inside the installed package."""
    return Path(__file__).resolve().parent / SAMPLE_SLIDE_NAME
