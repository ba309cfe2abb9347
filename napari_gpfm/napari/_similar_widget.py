"""Similar regions dock widget: draw a region, see where the slide (or a library) looks the same.

The query is the mean embedding of the tiles inside the drawn rectangle or polygon (the
selected shape, else the last one drawn), or the tile nearest a clicked point.

* Search in this slide: a similarity heatmap, the top-k tiles as rectangles coloured by score,
  and a table; clicking a row centres the view on that tile.
* Search in a library (made by ``gpfm index build``): the most similar tiles of all its slides
  as a gallery of thumbnails (:mod:`._gallery`); clicking one opens or switches to its slide,
  centred on the tile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from napari_gpfm.errors import ParameterError
from napari_gpfm.library.gallery import camera_for_box
from napari_gpfm.napari._gallery import LibraryResults, LibraryRow
from napari_gpfm.napari._overlays import edge_width_for, score_layer, tile_boxes_layer
from napari_gpfm.napari._qt_common import (
    SlidePicker,
    StoreRow,
    fill_table,
    guarded,
    guarded_with_status,
    make_table,
)
from napari_gpfm.napari._session import (
    OVERLAY_KEY,
    SlideRef,
    TileSet,
    points_level0,
    shape_level0_polygons,
)
from napari_gpfm.napari._slide_view import (
    drawn_over,
    find_slide_layer,
    layer_slide_fingerprint,
    place_result,
    reveal_slide,
)

if TYPE_CHECKING:
    import napari

QUERY_LAYER = "similarity query"
# How many tile widths the view spans after jumping to a result.
ZOOM_TILES = 6
IN_SLIDE = "this slide"
IN_LIBRARY = "a library"


def _selected_or_last(layer: Any, count: int) -> int | None:
    selected = sorted(getattr(layer, "selected_data", set()) or set())
    if selected:
        return int(selected[-1])
    return count - 1 if count else None


class SimilarWidget(QWidget):
    """Find the tiles most similar to a drawn region or a clicked point."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.last_result: Any = None
        self.last_tiles: TileSet | None = None

        self.slide_picker = SlidePicker(viewer)
        self.store_row = StoreRow(self.slide_picker)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems([IN_SLIDE, IN_LIBRARY])
        self.scope_combo.setToolTip(
            "Search the open slide, or a library of many slides (made by `gpfm index build` "
            "with the same encoder and tiling as this slide's embeddings)"
        )
        self.library_row = LibraryRow()
        self.group_check = QCheckBox("Group by slide: best")
        self.group_check.setToolTip(
            "List slides instead of tiles: the best regions of each of the most similar slides"
        )
        self.per_slide_spin = QSpinBox()
        self.per_slide_spin.setRange(1, 50)
        self.per_slide_spin.setValue(3)
        self.per_slide_spin.setSuffix(" per slide")
        self.query_combo = QComboBox()
        self.query_combo.setToolTip("The Shapes or Points layer holding the query region")
        self.box_button = QPushButton("Draw box")
        self.polygon_button = QPushButton("Draw polygon")
        self.point_button = QPushButton("Click point")
        self.k_label = QLabel("Top tiles")
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 1000)
        self.k_spin.setValue(20)
        self.exclude_check = QCheckBox("Leave out the query's own tiles")
        self.exclude_check.setChecked(True)
        self.search_button = QPushButton("Find similar tiles")
        self.table = make_table(["rank", "score", "x (px)", "y (px)"])
        self.table.setToolTip("Click a row to go to that tile (level-0 pixel coordinates)")
        self.library_results = LibraryResults(viewer)
        self.status = QLabel("Draw a box or polygon on the tissue you are interested in.")
        self.status.setWordWrap(True)

        # Library-only settings, shown in one block when "a library" is chosen.
        self.library_options = QWidget()
        library_layout = QVBoxLayout(self.library_options)
        library_layout.setContentsMargins(0, 0, 0, 0)
        library_layout.addWidget(self.library_row)
        group = QHBoxLayout()
        group.addWidget(self.group_check)
        group.addWidget(self.per_slide_spin)
        group.addStretch(1)
        library_layout.addWidget(_wrap(group))
        self.results = QStackedWidget()
        self.results.addWidget(self.table)
        self.results.addWidget(self.library_results)
        # napari pads a dock whose widgets all keep their preferred height with a stretch,
        # which would squeeze the table / gallery to a row: ask for the height instead.
        self.results.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)

        form = QFormLayout()
        form.addRow("Slide", self.slide_picker)
        form.addRow(self.store_row)
        form.addRow("Search in", self.scope_combo)
        form.addRow(self.library_options)
        form.addRow("Query layer", self.query_combo)
        draw = QHBoxLayout()
        for button in (self.box_button, self.polygon_button, self.point_button):
            draw.addWidget(button)
        form.addRow("Query", _wrap(draw))
        form.addRow(self.k_label, self.k_spin)
        form.addRow(self.exclude_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.search_button)
        layout.addWidget(self.status)
        layout.addWidget(self.results, 1)

        self.box_button.clicked.connect(lambda: self.start_query("add_rectangle"))
        self.polygon_button.clicked.connect(lambda: self.start_query("add_polygon"))
        self.point_button.clicked.connect(lambda: self.start_query("add"))
        self.search_button.clicked.connect(lambda: self.search())
        self.table.cellClicked.connect(lambda row, _col: self.go_to(row))
        self.scope_combo.currentIndexChanged.connect(lambda _i: self._show_scope())
        self.group_check.toggled.connect(lambda _on: self._show_scope())
        self.library_results.message.connect(self.status.setText)
        viewer.layers.events.inserted.connect(self._relist)
        viewer.layers.events.removed.connect(self._relist)
        self.slide_picker.slide_changed.connect(self._relist)
        self._relist()
        self._show_scope()

    # ------------------------------------------------------------------ scope
    @property
    def searches_library(self) -> bool:
        return self.scope_combo.currentText() == IN_LIBRARY

    @property
    def is_busy(self) -> bool:
        return self.library_results.is_busy

    def _show_scope(self) -> None:
        library = self.searches_library
        self.library_options.setVisible(library)
        self.per_slide_spin.setEnabled(self.group_check.isChecked())
        self.results.setCurrentWidget(self.library_results if library else self.table)
        self.search_button.setText("Search the library" if library else "Find similar tiles")
        grouped = library and self.group_check.isChecked()
        self.k_label.setText("Top slides" if grouped else "Top tiles")

    # ------------------------------------------------------------------ query layers
    def _relist(self, event: Any = None) -> None:
        from napari.layers import Points, Shapes

        current = self.query_combo.currentText()
        ref = self.slide_picker.current_ref()
        names = [lay.name for lay in self.viewer.layers if isinstance(lay, Shapes | Points)
                 and (lay.metadata.get(OVERLAY_KEY) or {}).get("kind") not in (
                     "similar-tiles", "geojson-tiles")
                 and drawn_over(lay, ref)]
        self.query_combo.blockSignals(True)
        self.query_combo.clear()
        self.query_combo.addItems(names)
        if current in names:
            self.query_combo.setCurrentText(current)
        elif names:
            self.query_combo.setCurrentIndex(len(names) - 1)
        self.query_combo.blockSignals(False)

    def query_layer(self) -> Any | None:
        name = self.query_combo.currentText()
        return next((lay for lay in self.viewer.layers if lay.name == name), None)

    @guarded
    def start_query(self, mode: str) -> None:
        """Make (or reuse) a query layer over the slide and switch it to drawing ``mode``."""
        from napari.layers import Points, Shapes

        ref = self.slide_picker.require_ref()
        slide_layer = self.slide_picker.current_layer()
        if slide_layer is not None:
            # Hidden by going to a library hit: bring the slide (and its layers) back to draw on.
            reveal_slide(self.viewer, slide_layer)
        wanted = Points if mode == "add" else Shapes
        name = f"{QUERY_LAYER} points" if mode == "add" else QUERY_LAYER
        # This slide's query layer: another slide's (same name, or "name [1]") stays its own.
        layer = next((lay for lay in self.viewer.layers
                      if isinstance(lay, wanted) and lay.name.startswith(name)
                      and (lay.metadata.get(OVERLAY_KEY) or {}).get("kind") == "query"
                      and layer_slide_fingerprint(lay) == ref.fingerprint), None)
        if layer is None:
            meta = {OVERLAY_KEY: {"kind": "query", "slide": ref.to_metadata()}}
            if wanted is Shapes:
                layer = self.viewer.add_shapes(
                    name=name, edge_color="#00e5ff", face_color="#00e5ff30",
                    edge_width=edge_width_for(ref), metadata=meta, **ref.layer_kwargs(),
                )
            else:
                layer = self.viewer.add_points(
                    name=name, face_color="#00e5ff", size=max(ref.dims) / 100.0,
                    metadata=meta, **ref.layer_kwargs(),
                )
        layer.visible = True
        self.viewer.layers.selection.active = layer
        layer.mode = mode
        self._relist()
        self.query_combo.setCurrentText(layer.name)

    def _query_roi(self, ref: SlideRef) -> tuple[Any, str]:
        """The query region in level-0 pixels, and a short description of it."""
        from napari.layers import Points, Shapes

        from napari_gpfm.analysis.geometry import Roi

        layer = self.query_layer()
        if layer is None:
            raise ParameterError(
                "no query yet: press 'Draw box' (or 'Draw polygon', 'Click point') and draw on "
                "the tissue you want to match"
            )
        if not drawn_over(layer, ref):
            raise ParameterError(
                f"the query layer {layer.name!r} was drawn on another slide, not {ref.name}: "
                "pick that slide, or press 'Draw box' to draw a query on this one"
            )
        if isinstance(layer, Shapes):
            index = _selected_or_last(layer, len(layer.data))
            if index is None:
                raise ParameterError(f"layer {layer.name!r} has no shape; draw a box on the tissue")
            [(_, polygon)] = shape_level0_polygons(layer, ref, [index])
            if polygon is None:
                raise ParameterError(
                    "the query shape is a line; draw a rectangle, polygon or ellipse instead"
                )
            return Roi.polygon(polygon), f"shape {index + 1} of {layer.name}"
        if isinstance(layer, Points):
            index = _selected_or_last(layer, len(layer.data))
            if index is None:
                raise ParameterError(f"layer {layer.name!r} has no point; click on the tissue")
            (x, y), = points_level0(layer, ref, [index])
            return Roi.point(x, y), f"point {index + 1} of {layer.name}"
        raise ParameterError(f"layer {layer.name!r} is not a Shapes or Points layer")

    def _checked_query(self, tiles: TileSet) -> tuple[Any, str]:
        """The query region over ``tiles``' slide, refused when it holds no embedded tile."""
        from napari_gpfm.analysis.geometry import tiles_in_roi

        roi, description = self._query_roi(tiles.ref)
        if len(tiles_in_roi(tiles.coords, tiles.tile_size_l0, roi)) == 0:
            raise ParameterError(
                f"the query ({description}) holds no embedded tissue tile: draw it over tissue "
                "(a tile counts when its centre is inside; a point must be on a tile)"
            )
        layer = self.query_layer()
        if layer is not None and OVERLAY_KEY not in layer.metadata:
            # Remember the slide under a user-made layer so it can be saved as GeoJSON.
            layer.metadata = {**layer.metadata,
                              OVERLAY_KEY: {"kind": "query", "slide": tiles.ref.to_metadata()}}
        return roi, description

    # ------------------------------------------------------------------ search
    @guarded_with_status
    def search(self) -> None:
        """Search this slide (heatmap, top tiles, table) or the chosen library (gallery)."""
        from napari_gpfm.analysis.search import query_vector, search_similar, similarity

        if self.searches_library:
            self.search_library()
            return
        session = self.slide_picker.session()
        tiles = session.tiles()
        roi, description = self._checked_query(tiles)
        result = search_similar(
            tiles.normed, tiles.coords, tiles.tile_size_l0, roi, k=int(self.k_spin.value()),
            exclude_query=self.exclude_check.isChecked(),
        )
        scores = similarity(tiles.normed, query_vector(tiles.normed, result.query_indices))
        score_name = "similarity to query"
        session.publish_score(score_name, scores, tiles, description)
        extra = {"query": description, "query_tiles": result.query_indices.tolist(),
                 "k": int(self.k_spin.value()), "exclude_query": self.exclude_check.isChecked()}
        place_result(
            self.viewer,
            score_layer(tiles, scores, f"{tiles.ref.name} · similarity", "similarity",
                        score_name, colormap="inferno", extra=extra),
            colour_bar=True,
        )
        place_result(
            self.viewer,
            tile_boxes_layer(tiles, result.indices, result.scores,
                             f"{tiles.ref.name} · similar tiles", "similar-tiles", extra=extra),
        )
        self.viewer.layers.selection.active = self.query_layer() or self.viewer.layers[-1]
        fill_table(self.table, [[r["rank"], r["score"], int(r["x"]), int(r["y"])]
                                for r in result.rows()])
        self.last_result = result
        self.last_tiles = tiles
        partial = " (embedding not finished)" if tiles.is_partial else ""
        nothing_left = (" (the query covers every tile and its own tiles are left out: untick "
                        "'Leave out the query's own tiles' or draw a smaller query)"
                        if len(result) == 0 else "")
        self.status.setText(
            f"Query: {len(result.query_indices)} tile(s) from {description}; "
            f"top {len(result)} of {len(tiles)} tiles shown{partial}{nothing_left}"
        )

    @guarded_with_status
    def search_library(self) -> None:
        """Search the chosen library with the query region, in a worker thread; the hits fill
        the gallery as their thumbnails are read."""
        from napari_gpfm.library.query import SearchOptions

        if self.library_results.is_busy:
            return
        if self.library_row.path is None:
            raise ParameterError(
                "no library chosen: press 'Choose library…' and pick a folder made by "
                "`gpfm index build`"
            )
        session = self.slide_picker.session()
        tiles = session.tiles()
        roi, description = self._checked_query(tiles)
        options = SearchOptions(
            top_k=int(self.k_spin.value()),
            per_slide=int(self.per_slide_spin.value()) if self.group_check.isChecked() else None,
            include_query=not self.exclude_check.isChecked(),
        )
        self.library_results.start(
            self.library_row.path, tiles.store_path, roi, options,
            {"query": description, "query_slide": tiles.ref.to_metadata()},
        )

    def go_to(self, row: int) -> None:
        """Centre the view on result ``row`` (0-based) and zoom in on it."""
        if self.last_result is None or self.last_tiles is None or not 0 <= row < len(
            self.last_result
        ):
            return
        ref = self.last_tiles.ref
        slide_layer = find_slide_layer(self.viewer, ref.fingerprint)
        if slide_layer is None:
            self.status.setText(f"{ref.name} is no longer open; open it and search again")
            return
        reveal_slide(self.viewer, slide_layer)  # a library hit may have switched to another
        view = camera_for_box(self.last_result.boxes[row], ref.scale_yx, ref.translate_yx,
                              self.viewer.canvas.size, ZOOM_TILES)
        camera = self.viewer.scene.camera
        camera.center = view.center_yx
        camera.zoom = view.zoom
        self.table.selectRow(row)


def _wrap(layout: QHBoxLayout) -> QWidget:
    box = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    box.setLayout(layout)
    return box
