"""Slides: open whole-slide images lazily and read them at any physical resolution."""

from napari_gpfm.slides.slide import (
    SLIDE_SUFFIXES,
    Slide,
    file_fingerprint,
    is_pixel_size,
    open_slide,
    resize_rgb,
)

__all__ = ["SLIDE_SUFFIXES", "Slide", "file_fingerprint", "is_pixel_size", "open_slide", "resize_rgb"]
