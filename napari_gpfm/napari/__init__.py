"""The napari face of napari-gpfm: reader, sample data, writers and dock widgets.

This subpackage is the only place that imports napari or Qt (through qtpy). Everything it shows
is computed by the Qt-free core; the widgets only gather parameters and place layers.
"""
