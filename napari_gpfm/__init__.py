"""napari-gpfm: look at whole-slide images through a pathology foundation model.

The core (slides, tiling, encoders, embedding, analysis, library) is Qt-free; the napari
integration lives in :mod:`napari_gpfm.napari`. Importing this package imports neither Qt,
napari nor torch: heavy modules are imported where they are used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open_slide"]


def __getattr__(name: str):
    # Lazy re-export so `import napari_gpfm` stays light.
    if name == "open_slide":
        from napari_gpfm.slides import open_slide

        return open_slide
    raise AttributeError(f"module 'napari_gpfm' has no attribute {name!r}")
