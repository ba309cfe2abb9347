"""Data that ships with napari-gpfm."""
