"""Embed dock widget: run an encoder over the chosen slide's tissue tiles, resumably.

The job (:mod:`._embed_job`) runs in a napari generator worker; every batch on disk comes back
to the main thread, which advances the progress bars and paints the tiles done so far on the
slide. Cancel stops the worker: the generator is closed in the worker thread, the engine writes
the batches already computed and the store keeps them, so pressing Embed again resumes.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor, QIcon, QPainter, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_gpfm.errors import GPFMError, ParameterError
from napari_gpfm.napari._embed_job import EmbedRequest, JobStage, JobStarted, embed_job
from napari_gpfm.napari._qt_common import (
    SlidePicker,
    closing_worker_class,
    guarded_with_status,
    notify_error,
)
from napari_gpfm.napari._session import (
    OVERLAY_KEY,
    STORE_CHANGED,
    SlideRef,
    default_output_dir,
    session_for,
    slide_layers,
)

if TYPE_CHECKING:
    import napari

DEVICES = ("auto", "cpu", "cuda", "mps")
PENDING_RGBA = (30, 30, 30, 70)
DONE_RGBA = (0, 190, 120, 150)
# Repainting the progress layer costs a texture upload; a few times a second is plenty.
REPAINT_INTERVAL_S = 0.3


class EmbedWidget(QWidget):
    """Choose a slide, an encoder and a tiling, then embed the slide's tissue tiles."""

    progressed = Signal(int, int)
    embedding_finished = Signal(object)

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker: Any = None
        self.tiles_done = 0
        self.tiles_total = 0
        self.progress_layer: Any = None
        self.last_result: Any = None
        self._cancel_event: threading.Event | None = None
        self._started: JobStarted | None = None
        self._request: EmbedRequest | None = None
        self._failure: str | None = None
        self._done_mask: np.ndarray | None = None
        self._cells: tuple[np.ndarray, np.ndarray] | None = None
        self._rgba: np.ndarray | None = None
        self._last_paint = 0.0
        self._pbar: Any = None
        self._t0 = 0.0
        self._events: collections.deque = collections.deque()
        self._draining = False
        self._shown_slide: Path | None = None
        self._checked_encoder: str | None = None
        self._entered_mpp: dict[Path, float] = {}  # slide pixel sizes the user typed

        self.slide_picker = SlidePicker(viewer)
        self.encoder_combo = QComboBox()
        self.encoder_combo.setEditable(True)
        self.encoder_combo.setToolTip(
            "An encoder from the registry, or timm:<architecture> for any timm model"
        )
        self.encoder_status = QLabel()
        self.encoder_status.setWordWrap(True)
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("found automatically when installed")
        self.weights_button = QPushButton("Browse…")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.05, 32.0)
        self.mpp_spin.setDecimals(3)
        self.mpp_spin.setSingleStep(0.25)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setValue(0.5)
        self.mpp_spin.setToolTip("Resolution the tiles are read at (0.5 µm/px is about 20x)")
        self.slide_mpp_spin = QDoubleSpinBox()
        self.slide_mpp_spin.setRange(0.0, 100.0)
        self.slide_mpp_spin.setDecimals(4)
        self.slide_mpp_spin.setSingleStep(0.25)
        self.slide_mpp_spin.setSuffix(" µm/px")
        self.slide_mpp_spin.setSpecialValueText("not recorded: enter it")
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(16, 4096)
        self.tile_spin.setValue(256)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile side read at that resolution (field of view = size x mpp)")
        self.tissue_spin = QDoubleSpinBox()
        self.tissue_spin.setRange(0.0, 1.0)
        self.tissue_spin.setSingleStep(0.05)
        self.tissue_spin.setValue(0.5)
        self.tissue_spin.setToolTip("Keep tiles with at least this fraction of tissue")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(32)
        self.out_edit = QLineEdit()
        self.out_button = QPushButton("Browse…")
        self.embed_button = QPushButton("Embed")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status = QLabel("Ready")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Slide", self.slide_picker)
        form.addRow("Encoder", self.encoder_combo)
        form.addRow("", self.encoder_status)
        form.addRow("Weights", _row(self.weights_edit, self.weights_button))
        form.addRow("Slide pixel size", self.slide_mpp_spin)
        form.addRow("Resolution", self.mpp_spin)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Min. tissue", self.tissue_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Output folder", _row(self.out_edit, self.out_button))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(_hbox(self.embed_button, self.cancel_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._fill_encoders()
        # Checked when a name is picked or typed in full, not on every keystroke: a
        # timm:<arch> name imports timm and torch (seconds, on the GUI thread, the first time).
        self.encoder_combo.currentIndexChanged.connect(lambda _i: self._encoder_changed())
        self.encoder_combo.lineEdit().editingFinished.connect(lambda: self._encoder_changed())
        self.slide_picker.slide_changed.connect(self._slide_changed)
        self.weights_button.clicked.connect(lambda: self._browse_weights())
        self.weights_edit.editingFinished.connect(lambda: self._show_weights_status())
        self.out_button.clicked.connect(lambda: self._browse_out())
        self.embed_button.clicked.connect(lambda: self.start())
        self.cancel_button.clicked.connect(lambda: self.cancel())
        self._encoder_changed()
        self._slide_changed()

    # ------------------------------------------------------------------ parameters
    def _fill_encoders(self) -> None:
        from napari_gpfm.encoders import model_table

        rows = model_table()
        for row in rows:
            found = row.weights is not None
            self.encoder_combo.addItem(_dot("#2ca02c" if found else "#7f7f7f"), row.name)
            tip = f"{row.display_name}: weights {row.weights}" if found else (
                f"{row.display_name}: {row.note}"
            )
            self.encoder_combo.setItemData(
                self.encoder_combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole
            )
        if any(row.name == "default" for row in rows):
            self.encoder_combo.setCurrentText("default")

    def _encoder_spec(self) -> Any:
        """The chosen encoder's spec, or None (its problem is shown under the picker)."""
        from napari_gpfm.napari._llvm_guard import keep_triton_out

        keep_triton_out()  # timm:<arch> names import timm (and with it torch) right here
        from napari_gpfm.encoders import get_spec

        try:
            return get_spec(self.encoder_combo.currentText().strip())
        except GPFMError as exc:
            self.encoder_status.setText(f"⚠ {exc}")
            return None

    def _encoder_changed(self) -> None:
        """A new encoder: its native tiling becomes the default, and its weights are looked up."""
        name = self.encoder_combo.currentText().strip()
        if name == self._checked_encoder:
            self._show_weights_status()  # the same one again: only look for its weights again
            return
        spec = self._encoder_spec()
        self._checked_encoder = None if spec is None else name
        if spec is None:
            return
        self.mpp_spin.setValue(float(spec.native_mpp))
        self.tile_spin.setValue(int(spec.native_read_size))
        self._show_weights_status(spec)

    def _show_weights_status(self, spec: Any = None) -> None:
        """Say where the encoder's weights come from (or that they are missing)."""
        from napari_gpfm.encoders import find_weights

        spec = spec if spec is not None else self._encoder_spec()
        if spec is None:
            return
        found = find_weights(spec)
        if self.weights_edit.text().strip():
            self.encoder_status.setText("✓ using the weights file below")
        elif found is not None:
            self.encoder_status.setText(f"✓ weights found: {found}")
        else:
            self.encoder_status.setText(
                f"✗ weights not found ({', '.join(spec.weights_filenames)}): choose the file below"
            )

    def _slide_changed(self) -> None:
        ref = self.slide_picker.current_ref()
        if ref is None or ref.path == self._shown_slide:
            return  # the layer list changed, not the slide: keep what the user chose
        if self._shown_slide is not None and self.slide_mpp_spin.isEnabled():
            self._entered_mpp[self._shown_slide] = float(self.slide_mpp_spin.value())
        self._shown_slide = ref.path
        self.out_edit.setText(str(default_output_dir(ref.path)))
        # A slide's own pixel size is shown, not edited; one that records none must be given
        # (and what the user entered for it is kept while they look at other slides).
        self.slide_mpp_spin.setEnabled(ref.mpp is None)
        self.slide_mpp_spin.setValue(ref.mpp or self._entered_mpp.get(ref.path, 0.0))
        self.slide_mpp_spin.setToolTip(
            "Recorded in the slide file" if ref.mpp is not None else
            "This file records no pixel size: enter the scan's microns per pixel "
            "(about 0.25 for 40x, 0.5 for 20x scans)"
        )

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Encoder weights", "", "Weights (*.safetensors *.pth *.pt *.bin);;All files (*)"
        )
        if path:
            self.weights_edit.setText(path)
            self._show_weights_status()

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder", self.out_edit.text())
        if folder:
            self.out_edit.setText(folder)

    def request(self) -> EmbedRequest:
        """The job the current settings describe (ParameterError if something is missing)."""
        ref = self.slide_picker.require_ref()
        model = self.encoder_combo.currentText().strip()
        if not model:
            raise ParameterError("choose an encoder (or type timm:<architecture>)")
        weights_text = self.weights_edit.text().strip()
        weights = Path(weights_text).expanduser() if weights_text else None
        if weights is not None and weights.is_dir():
            raise ParameterError(f"Weights {weights} is a folder; choose the weights file in it")
        if weights is not None and not weights.is_file():
            raise ParameterError(f"weights file {weights} not found; choose an existing file")
        if weights is None:
            self._require_found_weights()
        out_text = self.out_edit.text().strip()
        if not out_text:
            raise ParameterError("choose an output folder for the embeddings")
        from napari_gpfm.slides import is_pixel_size
        from napari_gpfm.tiling.grid import upsamples

        slide_mpp = ref.mpp if ref.mpp is not None else float(self.slide_mpp_spin.value())
        if not is_pixel_size(slide_mpp):
            raise ParameterError(
                f"{ref.name} records no pixel size: enter it under Slide pixel size (about "
                "0.25 µm/px for 40x, 0.5 for 20x scans)"
            )
        mpp = float(self.mpp_spin.value())
        if upsamples(slide_mpp, mpp):
            raise ParameterError(
                f"Resolution {mpp:g} µm/px is finer than the slide's own {slide_mpp:g} µm/px: "
                f"choose {slide_mpp:g} or coarser"
            )
        return EmbedRequest(
            slide_path=ref.path,
            model=model,
            weights=weights,
            slide_mpp=None if ref.mpp is not None else slide_mpp,
            mpp=mpp,
            read_size=int(self.tile_spin.value()),
            min_tissue=float(self.tissue_spin.value()),
            device=self.device_combo.currentText(),
            out_dir=Path(out_text).expanduser(),
            batch_size=int(self.batch_spin.value()),
        )

    def _require_found_weights(self) -> None:
        """Refuse here, in this panel's words, an encoder whose weights are nowhere to be found
        (the loader's own message speaks to the command line)."""
        from napari_gpfm.encoders import find_weights
        from napari_gpfm.encoders.registry import models_dir

        spec = self._encoder_spec()  # None: the loader says what is wrong with the name
        if spec is not None and find_weights(spec) is None:
            raise ParameterError(
                f"no weights for encoder '{spec.name}' ({', '.join(spec.weights_filenames)}): "
                f"choose its file under Weights, or put it in {models_dir()} "
                "(the folder $GPFM_MODELS_DIR names)"
            )

    # ------------------------------------------------------------------ running
    @property
    def is_running(self) -> bool:
        return self.worker is not None

    @guarded_with_status
    def start(self) -> None:
        """Start (or resume) embedding the chosen slide in a worker thread."""
        from napari.qt.threading import create_worker

        if self.is_running:
            return
        request = self.request()
        try:
            request.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ParameterError(
                f"cannot create the output folder {request.out_dir} ({exc.strerror}); "
                "choose another folder"
            ) from None
        self._cancel_event = threading.Event()
        self._request = request
        self._failure = None
        self._started = None
        self.last_result = None
        self.tiles_done = 0
        self.tiles_total = 0
        self._t0 = time.perf_counter()
        self.status.setText("Starting…")
        self.progress_bar.setRange(0, 0)  # busy until the tile count is known
        self.worker = create_worker(
            embed_job,
            request,
            self._cancel_event,
            _worker_class=closing_worker_class(),
            _connect={
                "yielded": self._on_yielded,
                "returned": self._on_returned,
                "errored": self._on_errored,
                "finished": self._on_finished,
            },
        )
        self.embed_button.setEnabled(False)
        self.cancel_button.setEnabled(True)

    def cancel(self) -> None:
        """Stop after the batch in progress; finished tiles stay in the store."""
        if self.worker is None:
            return
        self.status.setText("Stopping after the current batch…")
        if self._cancel_event is not None:
            self._cancel_event.set()
        self.worker.quit()
        self.cancel_button.setEnabled(False)

    # The worker's signals are queued here and handled strictly in order: napari's layer and
    # progress updates may process events while an item is handled, which would otherwise run
    # the next signal (even `finished`) inside the current one.
    def _on_yielded(self, item: Any) -> None:
        self._enqueue("item", item)

    def _on_returned(self, result: Any) -> None:
        self._enqueue("returned", result)

    def _on_errored(self, exc: BaseException) -> None:
        self._enqueue("errored", exc)

    def _on_finished(self) -> None:
        self._enqueue("finished", None)

    def _enqueue(self, kind: str, value: Any) -> None:
        self._events.append((kind, value))
        if self._draining:
            return
        self._draining = True
        bug: BaseException | None = None
        try:
            while self._events:
                kind, value = self._events.popleft()
                if kind == "errored" and not isinstance(value, GPFMError):
                    bug = value  # re-raised once `finished` has reset the widget
                    self._failure = f"{type(value).__name__}: {value}"
                    self.status.setText(f"Failed: {self._failure}")
                    continue
                self._handle(kind, value)
        finally:
            self._draining = False
        if bug is not None:
            raise bug

    def _handle(self, kind: str, value: Any) -> None:
        if kind == "item":
            if isinstance(value, JobStage):
                self.status.setText(value.message)
            elif isinstance(value, JobStarted):
                self._on_started(value)
            else:
                self._on_batch(value)
        elif kind == "returned":
            self.last_result = value
        elif kind == "errored":
            self._show_error(value)
        else:
            self._finish()

    def _on_started(self, job: JobStarted) -> None:
        from napari.utils import progress

        self._started = job
        self._done_mask = np.asarray(job.done, dtype=bool).copy()
        self.tiles_total = len(job.coords)
        self.tiles_done = int(self._done_mask.sum())
        ref = self._job_ref()
        if ref is not None:
            session_for(ref).use_store(job.store_path)
        self.progress_bar.setRange(0, max(self.tiles_total, 1))
        self.progress_bar.setValue(self.tiles_done)
        pending = self.tiles_total - self.tiles_done
        if pending:
            slide_name = Path(job.store_path).parent.name
            self._pbar = progress(total=pending, desc=f"Embedding {slide_name}")
            verb = "Resuming" if self.tiles_done else "Embedding"
            self.status.setText(
                f"{verb}: {self.tiles_done}/{self.tiles_total} tiles on {job.device}"
            )
        else:
            self.status.setText(f"Already embedded: {self.tiles_total} tiles in {job.store_path}")
        self._make_progress_layer(job)
        self.progressed.emit(self.tiles_done, self.tiles_total)

    def _job_ref(self) -> SlideRef | None:
        """The open slide layer the running job embeds (the picker may have moved on)."""
        if self._request is None:
            return None
        target = Path(self._request.slide_path).resolve()
        for layer in slide_layers(self.viewer):
            ref = SlideRef.from_layer(layer)
            if ref is not None and ref.path.resolve() == target:
                return ref
        return None

    def _on_batch(self, update: Any) -> None:
        if self._done_mask is None:
            return
        self._done_mask[np.asarray(update.batch_indices, dtype=np.int64)] = True
        self.tiles_done = int(update.done)
        self.progress_bar.setValue(self.tiles_done)
        if self._pbar is not None:
            self._pbar.update(len(update.batch_indices))
        rate = update.tiles_per_s
        left = (self.tiles_total - self.tiles_done) / rate if rate > 0 else float("nan")
        eta = f", about {left:.0f} s left" if np.isfinite(left) else ""
        self.status.setText(
            f"Embedding: {self.tiles_done}/{self.tiles_total} tiles, {rate:.1f} tiles/s{eta}"
        )
        now = time.perf_counter()
        if now - self._last_paint >= REPAINT_INTERVAL_S or self.tiles_done == self.tiles_total:
            self._paint_progress()
        self.progressed.emit(self.tiles_done, self.tiles_total)

    def _show_error(self, exc: BaseException) -> None:
        notify_error(exc)
        self._failure = str(exc)
        self.status.setText(f"Failed: {exc}")

    def _finish(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.worker = None
        self.embed_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)
        if self._started is not None:
            store = self._started.store_path
            self._sync_with_store(store)
            ref = self._job_ref()
            if ref is not None:
                STORE_CHANGED.emit(ref.fingerprint)  # the other widgets' store lines
            self._paint_progress()
            seconds = time.perf_counter() - self._t0
            if self._failure is not None:
                self.status.setText(
                    f"Failed: {self._failure} ({self.tiles_done}/{self.tiles_total} tiles kept; "
                    "press Embed to resume once it is fixed)"
                )
            elif bool(np.all(self._started.done)):
                self.status.setText(f"Already embedded: {self.tiles_total} tiles in {store}")
            elif self.tiles_done >= self.tiles_total:
                self.status.setText(
                    f"Done: {self.tiles_total} tiles in {seconds:.1f} s → {store}"
                )
                if self.progress_layer is not None and self.progress_layer in self.viewer.layers:
                    self.progress_layer.visible = False
            else:
                self.status.setText(
                    f"Stopped: {self.tiles_done}/{self.tiles_total} tiles kept in {store.name}; "
                    "press Embed to resume"
                )
        elif self._failure is None:  # stopped while the encoder loaded or tissue was found
            self.status.setText("Stopped before any tile was embedded; press Embed to start")
        self.embedding_finished.emit(self.last_result)

    def _sync_with_store(self, store_path: Path) -> None:
        """Read what is on disk: a stopped run also writes the batches it had in flight."""
        from napari_gpfm.embedding.store import EmbeddingStore

        try:
            done = EmbeddingStore.open(store_path).done
        except GPFMError:
            return
        if self._done_mask is not None and len(done) == len(self._done_mask):
            self._done_mask = done
            self.tiles_done = int(done.sum())
            self.progress_bar.setValue(self.tiles_done)

    # ------------------------------------------------------------------ progress layer
    def _make_progress_layer(self, job: JobStarted) -> None:
        from napari_gpfm.analysis.rasters import tile_raster
        from napari_gpfm.napari._overlays import place_layer

        ref = self._job_ref()
        if ref is None:
            return
        coords = np.asarray(job.coords, dtype=np.float64)
        raster = tile_raster(
            coords, job.tile_size_l0, np.zeros(len(coords)), job.slide_dims, job.stride_l0
        )
        centre = coords + job.tile_size_l0 / 2.0
        cells = np.array([raster.cell_of(x, y) for x, y in centre], dtype=np.int64).reshape(-1, 2)
        rows, cols = raster.data.shape[:2]
        cells[:, 0] = np.clip(cells[:, 0], 0, rows - 1)
        cells[:, 1] = np.clip(cells[:, 1], 0, cols - 1)
        self._cells = (cells[:, 0], cells[:, 1])
        self._rgba = np.zeros((rows, cols, 4), dtype=np.uint8)
        sy, sx = ref.scale_yx
        transform = raster.napari_transform((sx, sy))
        ty, tx = ref.translate_yx
        kwargs = {
            "name": f"{ref.name} · embedded tiles",
            "rgb": True,
            "interpolation2d": "nearest",
            "scale": transform["scale"],
            "translate": (transform["translate"][0] + ty, transform["translate"][1] + tx),
            "metadata": {
                OVERLAY_KEY: {
                    "kind": "embedding-progress",
                    "slide_path": str(ref.path),
                    "slide_fingerprint": ref.fingerprint,
                    "slide": ref.to_metadata(),
                    "encoder_id": job.encoder_id,
                    "encoder_name": job.encoder_name,
                    "tiling_id": job.tiling_id,
                    "store": str(job.store_path),
                    "tile_size_l0": job.tile_size_l0,
                }
            },
        }
        if ref.has_mpp:
            kwargs["units"] = ("um", "um")
        self._paint_cells()
        self.progress_layer = place_layer(self.viewer, (self._rgba.copy(), kwargs, "image"))
        self.progress_layer.visible = True  # a finished run hid it; this run shows its progress
        self._last_paint = time.perf_counter()

    def _paint_cells(self) -> None:
        if self._rgba is None or self._cells is None or self._done_mask is None:
            return
        rows, cols = self._cells
        self._rgba[rows, cols] = PENDING_RGBA
        done = self._done_mask
        self._rgba[rows[done], cols[done]] = DONE_RGBA

    def _paint_progress(self) -> None:
        if self.progress_layer is None or self.progress_layer not in self.viewer.layers:
            return
        self._paint_cells()
        self.progress_layer.data = self._rgba.copy()
        self._last_paint = time.perf_counter()


def _dot(colour: str) -> QIcon:
    """A small filled circle: green for encoders whose weights are installed, grey if not."""
    pixmap = QPixmap(12, 12)
    pixmap.fill(QColor(0, 0, 0, 0))
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setBrush(QColor(colour))
    painter.setPen(QColor(colour))
    painter.drawEllipse(1, 1, 10, 10)
    painter.end()
    return QIcon(pixmap)


def _row(*widgets: QWidget) -> QWidget:
    box = QWidget()
    layout = QHBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    for i, widget in enumerate(widgets):
        layout.addWidget(widget, 1 if i == 0 else 0)
    return box


def _hbox(*widgets: QWidget) -> QHBoxLayout:
    layout = QHBoxLayout()
    for widget in widgets:
        layout.addWidget(widget)
    return layout
