"""Maps dock widget: what the encoder sees across the slide, without any labels.

* PCA colours: tiles with similar embeddings get similar colours (an RGB overlay).
* Clusters: k-means groups of tiles as a Labels layer, with a table of colours and areas.
* Score maps: any per-tile score made in this session (similarity to a query, class
  probabilities) as an image with a colour map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_gpfm.errors import ParameterError
from napari_gpfm.napari._overlays import label_layer, rgb_layer, score_layer
from napari_gpfm.napari._qt_common import (
    SlidePicker,
    StoreRow,
    fill_table,
    guarded_with_status,
    make_table,
    run_task,
)
from napari_gpfm.napari._session import session_for
from napari_gpfm.napari._slide_view import place_result

if TYPE_CHECKING:
    import napari

COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "gray")


class _RefreshingCombo(QComboBox):
    """A combo box that relists its items each time it is opened."""

    def __init__(self, refresh, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._refresh = refresh

    def showPopup(self) -> None:  # noqa: N802 (Qt name)
        self._refresh()
        super().showPopup()


class MapsWidget(QWidget):
    """PCA colours, k-means clusters and score maps of the chosen slide's embeddings."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker: Any = None
        self.last_clusters: Any = None
        self._clusters_of: tuple[str, str] | None = None  # (slide, store) of the cluster table

        self.slide_picker = SlidePicker(viewer)
        self.store_row = StoreRow(self.slide_picker)

        self.pca_button = QPushButton("Show PCA colours")
        self.pca_button.setToolTip(
            "Colour each tile by its first three principal components: look-alike tissue "
            "gets look-alike colours"
        )
        self.k_spin = QSpinBox()
        self.k_spin.setRange(2, 40)
        self.k_spin.setValue(6)
        self.k_spin.setToolTip("How many groups of look-alike tiles to find")
        self.cluster_button = QPushButton("Find clusters")
        self.cluster_table = make_table(["cluster", "tiles", "area (mm²)", "share"])
        self.score_combo = _RefreshingCombo(self.refresh_scores)
        self.score_combo.setToolTip(
            "Per-tile scores made in this session by the Similar regions and ROI classifier widgets"
        )
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(COLORMAPS)
        self.score_button = QPushButton("Show score map")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        top = QFormLayout()
        top.addRow("Slide", self.slide_picker)
        top.addRow(self.store_row)

        pca_box = QGroupBox("Look-alike colours")
        pca_layout = QVBoxLayout(pca_box)
        pca_layout.addWidget(self.pca_button)

        cluster_box = QGroupBox("Clusters")
        cluster_layout = QVBoxLayout(cluster_box)
        k_row = QHBoxLayout()
        k_row.addWidget(QLabel("Number of clusters"))
        k_row.addWidget(self.k_spin)
        k_row.addWidget(self.cluster_button)
        cluster_layout.addLayout(k_row)
        cluster_layout.addWidget(self.cluster_table)

        score_box = QGroupBox("Score maps")
        score_form = QFormLayout(score_box)
        score_form.addRow("Score", self.score_combo)
        score_form.addRow("Colour map", self.cmap_combo)
        score_form.addRow(self.score_button)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(pca_box)
        layout.addWidget(cluster_box)
        layout.addWidget(score_box)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.pca_button.clicked.connect(lambda: self.show_pca())
        self.cluster_button.clicked.connect(lambda: self.show_clusters())
        self.score_button.clicked.connect(lambda: self.show_score())
        self.slide_picker.slide_changed.connect(self.refresh_scores)
        self.slide_picker.slide_changed.connect(self._forget_clusters)
        self.store_row.store_changed.connect(self.refresh_scores)
        self.store_row.store_changed.connect(self._forget_clusters)
        self.refresh_scores()

    def _forget_clusters(self) -> None:
        """The cluster table describes one slide's store: clear it when either changes."""
        stale = self.last_clusters is not None and self._clusters_of != self._current_source()
        if stale:
            self.cluster_table.setRowCount(0)
            self.last_clusters = None

    def _current_source(self) -> tuple[str, str] | None:
        ref = self.slide_picker.current_ref()
        if ref is None:
            return None
        info = session_for(ref).current_store()
        return (ref.fingerprint, str(info.path) if info is not None else "")

    @property
    def is_busy(self) -> bool:
        return self.worker is not None

    def _set_busy(self, busy: bool, message: str = "") -> None:
        for button in (self.pca_button, self.cluster_button, self.score_button):
            button.setEnabled(not busy)
        self.status.setText(message)

    def _finished(self) -> None:
        self.worker = None
        self._set_busy(False, self.status.text() if self.status.text() != "Working…" else "")

    # ------------------------------------------------------------------ PCA
    @guarded_with_status
    def show_pca(self) -> None:
        """Colour tiles by their first three principal components (RGB overlay)."""
        from napari_gpfm.analysis.maps import pca_rgb

        if self.is_busy:
            return
        tiles = self.slide_picker.session().tiles()
        if len(tiles) < 3:
            raise ParameterError(
                f"PCA colours need at least 3 embedded tiles, {tiles.ref.name} has {len(tiles)}"
            )
        self._set_busy(True, "Working…")

        def done(rgb: np.ndarray) -> None:
            name = f"{tiles.ref.name} · PCA colours"
            place_result(self.viewer, rgb_layer(tiles, rgb, name, "pca"))
            self.status.setText(f"PCA colours of {len(tiles)} tiles")

        self.worker = run_task(pca_rgb, tiles.features, on_result=done, on_finished=self._finished,
                               status=self.status)

    # ------------------------------------------------------------------ clusters
    @guarded_with_status
    def show_clusters(self) -> None:
        """k-means clusters as a Labels layer and a table of their areas."""
        from napari_gpfm.analysis.colours import rgb_to_hex
        from napari_gpfm.analysis.maps import cluster_table, kmeans_clusters

        if self.is_busy:
            return
        tiles = self.slide_picker.session().tiles()
        k = int(self.k_spin.value())
        if k > len(tiles):
            raise ParameterError(
                f"{k} clusters asked for but only {len(tiles)} tiles are embedded; lower the number"
            )
        self._set_busy(True, "Working…")

        def done(result: Any) -> None:
            colours = [rgb_to_hex(c) for c in result.colours]
            names = [f"cluster {i + 1}" for i in range(result.k)]
            rows = cluster_table(result.labels, result.k, tiles.tile_area_mm2, result.colours)
            place_result(
                self.viewer,
                label_layer(
                    tiles, result.labels, names, colours, f"{tiles.ref.name} · clusters",
                    "clusters", extra={"k": result.k},
                ),
            )
            fill_table(
                self.cluster_table,
                [[f"{r['cluster'] + 1}", r["tiles"], r["area_mm2"], f"{100 * r['fraction']:.1f} %"]
                 for r in rows],
                swatches=colours,
            )
            self.last_clusters = result
            self._clusters_of = self._current_source()
            partial = (
                " (embedding not finished: areas cover the tiles done)" if tiles.is_partial else ""
            )
            self.status.setText(f"{result.k} clusters of {len(tiles)} tiles{partial}")

        self.worker = run_task(
            kmeans_clusters, tiles.features, k, on_result=done, on_finished=self._finished,
            status=self.status,
        )

    # ------------------------------------------------------------------ scores
    def refresh_scores(self) -> None:
        """Relist the per-tile scores available for the chosen slide."""
        ref = self.slide_picker.current_ref()
        current = self.score_combo.currentText()
        self.score_combo.clear()
        names: list[str] = []
        if ref is not None:
            names = [s.name for s in session_for(ref).current_scores()]
        if names:
            self.score_combo.addItems(names)
            if current in names:
                self.score_combo.setCurrentText(current)
            else:
                self.score_combo.setCurrentIndex(len(names) - 1)
        else:
            self.score_combo.addItem("(none yet: run a similarity search or train a classifier)")

    @guarded_with_status
    def show_score(self, name: str | None = None) -> None:
        """Show a per-tile score as an image with the chosen colour map."""
        session = self.slide_picker.session()
        session.tiles()  # an informative error when there are no embeddings
        scores = {s.name: s for s in session.current_scores()}
        name = name or self.score_combo.currentText()
        if name not in scores:
            raise ParameterError(
                "no score to show yet: find similar regions or train the ROI classifier first"
            )
        score = scores[name]
        # Its own layer ("... · score map"): the panel that made the score keeps its layer
        # (a classifier's probability map stays 0-1, viridis, and is updated by retraining).
        place_result(
            self.viewer,
            score_layer(
                score.tiles, score.values, f"{score.tiles.ref.name} · {name} · score map",
                "score", name, colormap=self.cmap_combo.currentText(),
                extra={"score": name, "description": score.description},
            ),
            colour_bar=True,
        )
        self.status.setText(f"Showing {name}")
