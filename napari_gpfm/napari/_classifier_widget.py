"""ROI classifier dock widget: label a few regions, get a tissue map of the whole slide.

Convention: one Shapes layer ("training regions") holds every labelled region; each shape's
class is its ``features["class"]`` and its colour is the class colour. Pick a class in the
list, press a drawing button, draw; shapes drawn while a class is picked get that class. Shapes
drawn earlier (or read from a QuPath GeoJSON with classes) work too: their classes are added
to the list when training. "Train" fits a class-balanced linear probe on the tiles inside the
regions, reports its cross-validated accuracy, and classifies every embedded tile.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_gpfm.errors import ParameterError
from napari_gpfm.napari._overlays import edge_width_for, label_layer, score_layer
from napari_gpfm.napari._qt_common import (
    SlidePicker,
    StoreRow,
    fill_table,
    guarded_with_status,
    make_table,
    run_task,
)
from napari_gpfm.napari._session import (
    OVERLAY_KEY,
    TILES_KEY,
    SlideRef,
    TileSet,
    shape_level0_polygons,
)
from napari_gpfm.napari._slide_view import drawn_over, place_result

if TYPE_CHECKING:
    import napari

REGIONS_LAYER = "training regions"
FACE_ALPHA = "40"  # hex alpha of region fills: the tissue stays visible underneath


def _palette_hex(n: int) -> list[str]:
    from napari_gpfm.analysis.colours import categorical_colours, rgb_to_hex

    return [rgb_to_hex(c) for c in categorical_colours(n)]


def _hex_rgba(colour: str, alpha: float = 1.0) -> np.ndarray:
    from napari_gpfm.analysis.colours import hex_to_rgb

    r, g, b = hex_to_rgb(colour)
    return np.array([r / 255.0, g / 255.0, b / 255.0, alpha])


class ClassifierWidget(QWidget):
    """Train a linear probe from labelled regions and map tissue classes over the slide."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker: Any = None
        self.probe: Any = None
        self.probabilities: np.ndarray | None = None
        self.predicted: np.ndarray | None = None
        self.tiles: TileSet | None = None
        self.class_colours: dict[str, str] = {}

        self.slide_picker = SlidePicker(viewer)
        self.store_row = StoreRow(self.slide_picker)
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The Shapes layer whose regions carry the classes")
        self.new_layer_button = QPushButton("New regions layer")
        self.class_list = QListWidget()
        self.class_list.setToolTip("Pick a class, then draw: new regions get this class")
        self.class_list.setMaximumHeight(120)
        self.class_edit = QLineEdit()
        self.class_edit.setPlaceholderText("class name, e.g. epidermis")
        self.add_class_button = QPushButton("Add class")
        self.remove_class_button = QPushButton("Remove")
        self.rect_button = QPushButton("Rectangle")
        self.polygon_button = QPushButton("Polygon")
        self.lasso_button = QPushButton("Freehand")
        self.assign_button = QPushButton("Give selected regions this class")
        self.prob_check = QCheckBox("Also show a probability map per class")
        self.train_button = QPushButton("Train and map the slide")
        self.cv_label = QLabel("")
        self.cv_label.setWordWrap(True)
        self.area_table = make_table(["class", "tiles", "area (mm²)", "share"])
        self.save_button = QPushButton("Save classifier…")
        self.load_button = QPushButton("Load classifier…")
        self.export_button = QPushButton("Export map as GeoJSON…")
        self.status = QLabel("Add a class, pick it, and draw regions of it on the slide.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Slide", self.slide_picker)
        form.addRow(self.store_row)
        form.addRow("Regions", _hrow(self.layer_combo, self.new_layer_button))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(QLabel("Classes"))
        layout.addWidget(self.class_list)
        layout.addWidget(_hrow(self.class_edit, self.add_class_button, self.remove_class_button))
        layout.addWidget(_hrow(QLabel("Draw:"), self.rect_button, self.polygon_button,
                               self.lasso_button))
        layout.addWidget(self.assign_button)
        layout.addWidget(self.prob_check)
        layout.addWidget(self.train_button)
        layout.addWidget(self.cv_label)
        layout.addWidget(self.area_table, 1)
        layout.addWidget(_hrow(self.save_button, self.load_button))
        layout.addWidget(self.export_button)
        layout.addWidget(self.status)

        self.new_layer_button.clicked.connect(lambda: self.new_regions_layer())
        self.add_class_button.clicked.connect(lambda: self.add_class(self.class_edit.text()))
        self.class_edit.returnPressed.connect(lambda: self.add_class(self.class_edit.text()))
        self.remove_class_button.clicked.connect(lambda: self._remove_class())
        self.class_list.currentRowChanged.connect(lambda _r: self._class_picked())
        self.rect_button.clicked.connect(lambda: self.draw("add_rectangle"))
        self.polygon_button.clicked.connect(lambda: self.draw("add_polygon"))
        self.lasso_button.clicked.connect(lambda: self.draw("add_polygon_lasso"))
        self.assign_button.clicked.connect(lambda: self.assign_selected())
        self.train_button.clicked.connect(lambda: self.train())
        self.save_button.clicked.connect(lambda: self._ask_save())
        self.load_button.clicked.connect(lambda: self._ask_load())
        self.export_button.clicked.connect(lambda: self._ask_export())
        viewer.layers.events.inserted.connect(self._relist)
        viewer.layers.events.removed.connect(self._relist)
        self.slide_picker.slide_changed.connect(self._relist)
        self._relist()

    # ------------------------------------------------------------------ regions layer
    def _relist(self, event: Any = None) -> None:
        from napari.layers import Shapes

        current = self.layer_combo.currentText()
        ref = self.slide_picker.current_ref()
        # Regions of the chosen slide (or of no slide in particular); never results read back
        # (tiles of an exported map are predictions, not labels) or query boxes.
        names = [lay.name for lay in self.viewer.layers if isinstance(lay, Shapes)
                 and (lay.metadata.get(OVERLAY_KEY) or {}).get("kind") not in (
                     "similar-tiles", "query", "geojson-tiles")
                 and drawn_over(lay, ref)]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        added = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        if added is not None and added.name in names and len(added.data) and \
                "class" in getattr(added, "features", {}):
            self.layer_combo.setCurrentText(added.name)  # e.g. annotations just read from GeoJSON
        elif current in names:
            self.layer_combo.setCurrentText(current)
        elif REGIONS_LAYER in names:
            self.layer_combo.setCurrentText(REGIONS_LAYER)
        self.layer_combo.blockSignals(False)

    def regions_layer(self) -> Any | None:
        name = self.layer_combo.currentText()
        return next((lay for lay in self.viewer.layers if lay.name == name), None)

    @guarded_with_status
    def new_regions_layer(self) -> Any:
        """Add an empty regions layer over the chosen slide and make it the training layer."""
        ref = self.slide_picker.require_ref()
        layer = self.viewer.add_shapes(
            name=REGIONS_LAYER,
            features={"class": np.array([], dtype=object)},
            edge_width=edge_width_for(ref),
            metadata={OVERLAY_KEY: {"kind": "regions", "slide": ref.to_metadata()}},
            **ref.layer_kwargs(),
        )
        self._relist()
        self.layer_combo.setCurrentText(layer.name)
        self._class_picked()
        return layer

    def _ensure_layer(self) -> Any:
        from napari.layers import Shapes

        layer = self.regions_layer()
        if layer is None or not isinstance(layer, Shapes) or not drawn_over(
            layer, self.slide_picker.current_ref()
        ):
            layer = self.new_regions_layer()
            if layer is None:
                raise ParameterError("open a slide first, then draw regions on it")
        return layer

    # ------------------------------------------------------------------ classes
    @property
    def class_names(self) -> list[str]:
        role = Qt.ItemDataRole.UserRole
        return [self.class_list.item(i).data(role) for i in range(self.class_list.count())]

    @guarded_with_status
    def add_class(self, name: str, colour: str | None = None) -> None:
        """Add a class (its colour comes from the palette unless given) and pick it."""
        name = (name or "").strip()
        if not name:
            raise ParameterError("type a class name first, e.g. epidermis")
        if name not in self.class_colours:
            used = set(self.class_colours.values())
            palette = [c for c in _palette_hex(len(used) + 12) if c not in used]
            self.class_colours[name] = colour or palette[0]
        if name not in self.class_names:
            swatch = QPixmap(14, 14)
            swatch.fill(QColor(self.class_colours[name]))
            item = QListWidgetItem(QIcon(swatch), name)
            item.setData(Qt.ItemDataRole.UserRole, name)
            self.class_list.addItem(item)
        self.class_edit.clear()
        self.class_list.setCurrentRow(self.class_names.index(name))

    def _remove_class(self) -> None:
        row = self.class_list.currentRow()
        if row >= 0:
            self.class_list.takeItem(row)

    def current_class(self) -> str | None:
        item = self.class_list.currentItem()
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    def _class_picked(self) -> None:
        """New regions drawn from now on get the picked class and its colour."""
        layer = self.regions_layer()
        name = self.current_class()
        if layer is None or not hasattr(layer, "feature_defaults"):
            return
        if name is None:  # the last class was removed: what is drawn now would keep its name
            if "class" in layer.features.columns:
                layer.feature_defaults = {**_defaults_dict(layer), "class": ""}
            if str(layer.mode).startswith("add_"):
                layer.mode = "pan_zoom"
            return
        if "class" not in layer.features.columns:
            layer.features = {**{c: layer.features[c] for c in layer.features.columns},
                              "class": [""] * len(layer.data)}
        layer.feature_defaults = {**_defaults_dict(layer), "class": name}
        colour = self.class_colours[name]
        layer.current_edge_color = colour
        layer.current_face_color = colour + FACE_ALPHA

    @guarded_with_status
    def draw(self, mode: str) -> None:
        """Switch the regions layer (made if needed) to a drawing mode for the picked class."""
        if self.current_class() is None:
            raise ParameterError("add or pick a class first; the regions you draw get its name")
        layer = self._ensure_layer()
        self._class_picked()
        self.viewer.layers.selection.active = layer
        layer.mode = mode

    @guarded_with_status
    def assign_selected(self) -> None:
        """Give the selected regions the picked class (and its colour)."""
        layer = self.regions_layer()
        name = self.current_class()
        if name is None:
            raise ParameterError("pick a class in the list first")
        if layer is None or not layer.selected_data:
            raise ParameterError("select regions first (select tool in the layer controls)")
        selected = sorted(layer.selected_data)
        features = layer.features.copy()
        if "class" not in features.columns:
            features["class"] = ""
        features.loc[selected, "class"] = name
        layer.features = features
        edge = np.asarray(layer.edge_color).copy()
        face = np.asarray(layer.face_color).copy()
        edge[selected] = _hex_rgba(self.class_colours[name])
        face[selected] = _hex_rgba(self.class_colours[name], int(FACE_ALPHA, 16) / 255.0)
        layer.edge_color = edge
        layer.face_color = face
        self.status.setText(f"{len(selected)} region(s) are now {name}")

    def _labelled_regions(self, ref: SlideRef) -> list[tuple[np.ndarray, str]]:
        from napari.layers import Shapes

        layer = self.regions_layer()
        if layer is None or not isinstance(layer, Shapes) or len(layer.data) == 0:
            raise ParameterError(
                "no labelled regions yet: add a class, press Rectangle and draw on the slide"
            )
        if not drawn_over(layer, ref):
            raise ParameterError(
                f"the regions of {layer.name!r} were drawn on another slide, not {ref.name}: "
                "pick that slide, or draw this slide's regions (a new regions layer is made "
                "when you draw)"
            )
        if "class" not in layer.features.columns:
            raise ParameterError(
                f"the regions of {layer.name!r} have no class; select them, pick a class and "
                "press 'Give selected regions this class'"
            )
        if OVERLAY_KEY not in layer.metadata:
            layer.metadata = {**layer.metadata,
                              OVERLAY_KEY: {"kind": "regions", "slide": ref.to_metadata()}}
        classes = [str(c).strip() if c is not None else "" for c in layer.features["class"]]
        edge = np.asarray(layer.edge_color)
        out = []
        for index, polygon in shape_level0_polygons(layer, ref):
            name = classes[index] if index < len(classes) else ""
            if polygon is None or not name or name == "nan":
                continue
            if name not in self.class_colours:
                rgb = np.clip(np.rint(edge[index][:3] * 255), 0, 255).astype(int)
                self.add_class(name, "#{:02x}{:02x}{:02x}".format(*rgb))
            out.append((polygon, name))
        if not out:
            raise ParameterError(
                f"none of the regions of {layer.name!r} has a class; pick a class and draw, or "
                "select regions and press 'Give selected regions this class'"
            )
        return out

    # ------------------------------------------------------------------ training
    @property
    def is_busy(self) -> bool:
        return self.worker is not None

    @guarded_with_status
    def train(self) -> None:
        """Fit the probe on the tiles inside the labelled regions, then map every tile."""
        from napari_gpfm.analysis.classify import LinearProbe, labels_from_rois, left_out_note
        from napari_gpfm.analysis.geometry import Roi

        if self.is_busy:
            return
        tiles = self.slide_picker.session().tiles()
        regions = self._labelled_regions(tiles.ref)  # adds classes first seen in the layer
        listed = self.class_names
        unlisted = sorted({name for _, name in regions} - set(listed))
        regions = [(p, name) for p, name in regions if name in listed]
        rois = [(Roi.polygon(p), name) for p, name in regions]
        keep, labels = labels_from_rois(tiles.coords, tiles.tile_size_l0, rois)
        used = [n for n in listed if n in set(labels.tolist())]
        empty = sorted({name for _, name in regions} - set(used))
        notes = [left_out_note(empty, [(rois, tiles.coords, tiles.tile_size_l0)])] if empty else []
        if unlisted:
            notes.append(f"ignored the regions of {', '.join(repr(m) for m in unlisted)} "
                         "(removed from the class list)")
        if len(used) < 2:
            have = f"only {used[0]!r} has" if used else "no class has"
            raise ParameterError(
                f"a classifier needs at least 2 classes with embedded tiles in their regions; "
                f"{have} them: draw regions of another class over tissue"
                + "".join(f"; {note}" for note in notes)
            )
        probe = LinearProbe(
            class_names=used,
            colours=[self.class_colours[n] for n in used],
            encoder_id=tiles.encoder_id,
            tiling_id=tiles.tiling_id,
        )

        def fit_and_predict() -> tuple[Any, np.ndarray]:
            probe.fit(tiles.features[keep], labels)
            return probe, probe.predict_proba(tiles.features)

        self._start(f"Training on {len(keep)} labelled tiles…")
        self.worker = run_task(
            fit_and_predict,
            on_result=lambda r: self._show(r[0], r[1], tiles, notes),
            on_finished=self._finished,
            status=self.status,
        )

    def _start(self, message: str) -> None:
        for button in (self.train_button, self.load_button, self.save_button, self.export_button):
            button.setEnabled(False)
        self.status.setText(message)

    def _finished(self) -> None:
        self.worker = None
        for button in (self.train_button, self.load_button, self.save_button, self.export_button):
            button.setEnabled(True)

    def _show(self, probe: Any, probs: np.ndarray, tiles: TileSet,
              notes: tuple[str, ...] | list[str] = ()) -> None:
        from napari_gpfm.analysis.classify import area_table
        from napari_gpfm.analysis.colours import rgb_to_hex

        session = self.slide_picker.session()
        pred = np.argmax(probs, axis=1).astype(np.int64)
        names = list(probe.class_names)
        self._retire_probability_maps(session, tiles, names)
        colours = [rgb_to_hex(c) for c in probe.colours]
        for name, colour in zip(names, colours, strict=True):
            if name not in self.class_colours:
                self.add_class(name, colour)
        measurements = {_probability(n): probs[:, i] for i, n in enumerate(names)}
        extra = {"classes": names, "probe": probe.metadata()}
        place_result(
            self.viewer,
            label_layer(tiles, pred, names, colours, f"{tiles.ref.name} · tissue classes",
                        "classes", measurements=measurements, extra=extra),
        )
        for i, name in enumerate(names):
            session.publish_score(_probability(name), probs[:, i], tiles, PROBABILITY)
            layer_name = f"{tiles.ref.name} · {_probability(name)}"
            shown = any(lay.name == layer_name for lay in self.viewer.layers)
            if self.prob_check.isChecked() or shown:  # a map already shown is kept current
                place_result(
                    self.viewer,
                    score_layer(tiles, probs[:, i], layer_name, "probability", _probability(name),
                                colormap="viridis", extra=extra, limits=(0.0, 1.0)),
                    colour_bar=True,
                )
        rows = area_table(pred, names, tiles.tile_area_mm2, colours)
        fill_table(
            self.area_table,
            [[r["class"], r["tiles"], r["area_mm2"], f"{100 * r['fraction']:.1f} %"] for r in rows],
            swatches=colours,
        )
        self.probe, self.probabilities, self.predicted, self.tiles = probe, probs, pred, tiles
        self.cv_label.setText(_cv_text(probe))
        partial = " (embedding not finished: only embedded tiles are mapped)" if tiles.is_partial \
            else ""
        said = "".join(f"; {note}" for note in notes)
        self.status.setText(f"Mapped {len(tiles)} tiles into {len(names)} classes{partial}{said}")

    def _retire_probability_maps(self, session: Any, tiles: TileSet, names: list[str]) -> None:
        """Scores and maps of classes the new classifier lacks: dropped from the session (Maps
        no longer offers them) and their layers renamed, not removed (a hidden layer's removal
        can crash napari on llvmpipe; see _overlays.place_layer)."""
        kept = {_probability(n) for n in names}
        for key in [k for k, score in session.scores.items()
                    if score.description == PROBABILITY and k not in kept]:
            del session.scores[key]
        for layer in self.viewer.layers:
            # A probability map of this slide, named as _show names it (not retired already).
            if (layer.metadata.get(OVERLAY_KEY) or {}).get("kind") != "probability":
                continue
            scores = (layer.metadata.get(TILES_KEY) or {}).get("measurements", {})
            stale = [s for s in scores if layer.name == f"{tiles.ref.name} · {s}" and s not in kept]
            if stale:
                layer.name = f"{layer.name} · previous classifier"

    # ------------------------------------------------------------------ save / load / export
    @guarded_with_status
    def save_classifier(self, path: str | Path) -> Path:
        """Write the trained classifier (a .npz of plain arrays + its encoder and tiling)."""
        if self.probe is None:
            raise ParameterError("train the classifier (or load one) before saving it")
        saved = self.probe.save(path)
        self.status.setText(f"Classifier saved to {saved}")
        return saved

    @guarded_with_status
    def load_classifier(self, path: str | Path) -> None:
        """Load a classifier and map the slide; refuse one made for another encoder or tiling."""
        from napari_gpfm.analysis.classify import LinearProbe

        if self.is_busy:
            return
        tiles = self.slide_picker.session().tiles()
        probe = LinearProbe.load(
            path, expected_encoder_id=tiles.encoder_id, expected_tiling_id=tiles.tiling_id
        )
        self._start(f"Mapping with {Path(path).name}…")
        self.worker = run_task(
            probe.predict_proba, tiles.features,
            on_result=lambda probs: self._show(probe, probs, tiles),
            on_finished=self._finished,
            status=self.status,
        )

    @guarded_with_status
    def export_predictions(self, path: str | Path) -> Path:
        """Write every mapped tile as a QuPath GeoJSON tile with its class and probabilities."""
        from napari_gpfm.napari._geojson_io import write_tiles_geojson

        layer = next((lay for lay in self.viewer.layers
                      if (lay.metadata.get(OVERLAY_KEY) or {}).get("kind") == "classes"
                      and self.tiles is not None
                      and lay.metadata[OVERLAY_KEY].get("store") == str(self.tiles.store_path)),
                     None)
        if layer is None:
            raise ParameterError("train the classifier (or load one) to make a map to export")
        data, meta, _ = layer.as_layer_data_tuple()
        [written] = write_tiles_geojson(str(path), data, meta)
        self.status.setText(f"Exported {len(self.predicted)} tiles to {written}")
        return Path(written)

    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save classifier", "classifier.npz",
                                              "Classifier (*.npz)")
        if path:
            self.save_classifier(path)

    def _ask_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load classifier", "", "Classifier (*.npz)")
        if path:
            self.load_classifier(path)

    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export map for QuPath", "tissue-map.geojson",
                                              "GeoJSON (*.geojson)")
        if path:
            self.export_predictions(path)


PROBABILITY = "classifier probability"  # the description of the scores published here


def _probability(name: str) -> str:
    """The score, measurement and layer-name suffix of a class's probability."""
    return f"p({name})"


def _defaults_dict(layer: Any) -> dict:
    defaults = layer.feature_defaults
    return {c: defaults[c].iloc[0] for c in defaults.columns} if len(defaults.columns) else {}


def _cv_text(probe: Any) -> str:
    counts = ", ".join(f"{n}: {c}" for n, c in probe.train_counts.items())
    cv = probe.cv
    if cv is None or cv.accuracy is None:
        reason = cv.reason if cv is not None else "no cross-validation"
        return f"Trained on {counts} tiles. Accuracy not measured: {reason}."
    return (
        f"Cross-validated accuracy {100 * cv.accuracy:.0f} % (balanced "
        f"{100 * cv.balanced_accuracy:.0f} %, {cv.folds} folds) on labelled tiles ({counts})."
    )


def _hrow(*widgets: QWidget) -> QWidget:
    box = QWidget()
    layout = QHBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    return box
