"""Qt pieces the dock widgets share: slide picker, store row, tables, errors, background tasks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_gpfm.errors import GPFMError, ParameterError
from napari_gpfm.napari._session import (
    STORE_CHANGED,
    SlideRef,
    SlideSession,
    session_for,
    slide_layers,
)

NO_SLIDE = (
    "open a slide first: File > Open Sample > napari-gpfm, or drop a slide file "
    "(.svs, .ndpi, .tif) on the viewer"
)


def notify_error(exc: BaseException) -> None:
    """Show a user error as a napari notification (one line, no traceback)."""
    from napari.utils.notifications import show_error

    show_error(str(exc))


def guarded(method: Callable, *, on_status_line: bool = False) -> Callable:
    """Run a widget action; a GPFMError becomes an error notification instead of a traceback.

    With ``on_status_line`` (see :func:`guarded_with_status`) the refusal also replaces the
    widget's ``status`` line.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except GPFMError as exc:
            if on_status_line:
                args[0].status.setText(f"Refused: {exc}")
            notify_error(exc)
            return None

    return wrapper


def guarded_with_status(method: Callable) -> Callable:
    """:func:`guarded` for an action whose widget has a ``status`` line, which must not go on
    showing an earlier outcome as if it were this refused action's."""
    return guarded(method, on_status_line=True)


def run_task(
    func: Callable[..., Any],
    *args: Any,
    on_result: Callable[[Any], None],
    on_finished: Callable[[], None] | None = None,
    status: QLabel | None = None,
) -> Any:
    """Run ``func(*args)`` in a worker thread; ``on_result`` gets its value on the main thread.

    A GPFMError raised by ``func`` or by ``on_result`` (e.g. the slide was closed meanwhile) is
    shown as an error notification, and on the ``status`` line when one is given; any other
    exception is a bug and is re-raised on the main thread (napari shows it with its traceback).
    """
    from napari.qt.threading import create_worker
    from superqt.utils import FunctionWorker

    def report(exc: GPFMError, prefix: str) -> None:
        if status is not None:
            status.setText(f"{prefix}: {exc}")
        notify_error(exc)

    def on_error(exc: BaseException) -> None:
        if isinstance(exc, GPFMError):
            report(exc, "Failed")
        else:
            raise exc

    def on_returned(value: Any) -> None:
        try:
            on_result(value)
        except GPFMError as exc:
            report(exc, "Not shown")

    connect: dict[str, Any] = {"returned": on_returned, "errored": on_error}
    if on_finished is not None:
        connect["finished"] = on_finished
    # superqt's worker class: napari's own relays each exception as a traceback notification.
    return create_worker(func, *args, _connect=connect, _worker_class=FunctionWorker)


class SlidePicker(QComboBox):
    """The slides open in the viewer (image layers read by napari-gpfm)."""

    slide_changed = Signal()

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._layers: list = []
        self.setToolTip("The slide to work on (a layer opened by napari-gpfm)")
        self.currentIndexChanged.connect(lambda _i: self.slide_changed.emit())
        viewer.layers.events.inserted.connect(self._refresh_event)
        viewer.layers.events.removed.connect(self._refresh_event)
        self.refresh()

    def _refresh_event(self, event: Any = None) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Relist the slide layers, keeping the current choice when it is still open."""
        current = self.current_layer()
        layers = slide_layers(self.viewer)
        for layer in layers:
            if layer not in self._layers:  # follow renames: results are named after the layer
                layer.events.name.connect(self._refresh_event)
        names = [layer.name for layer in layers]
        if layers == self._layers and names == [self.itemText(i) for i in range(self.count())]:
            return
        self.blockSignals(True)
        self.clear()
        self._layers = layers
        for layer in layers:
            self.addItem(layer.name)
        if not layers:
            self.addItem("(no slide open)")
        index = layers.index(current) if current in layers else 0
        self.setCurrentIndex(index)
        self.blockSignals(False)
        self.slide_changed.emit()

    def current_layer(self) -> Any | None:
        index = self.currentIndex()
        if 0 <= index < len(self._layers) and self._layers[index] in self.viewer.layers:
            return self._layers[index]
        return None

    def current_ref(self) -> SlideRef | None:
        layer = self.current_layer()
        return None if layer is None else SlideRef.from_layer(layer)

    def require_ref(self) -> SlideRef:
        """The chosen slide, or ParameterError telling the user to open one."""
        ref = self.current_ref()
        if ref is None:
            raise ParameterError(NO_SLIDE)
        return ref

    def session(self) -> SlideSession:
        return session_for(self.require_ref())


def label_and_button(row: QWidget, button_text: str, tooltip: str) -> tuple[QLabel, QPushButton]:
    """Fill ``row`` with a word-wrapped status label and a button at its right."""
    label = QLabel()
    label.setWordWrap(True)
    button = QPushButton(button_text)
    button.setToolTip(tooltip)
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(label, 1)
    layout.addWidget(button)
    return label, button


class StoreRow(QWidget):
    """Shows the embedding store used for the chosen slide, with a button to choose another."""

    store_changed = Signal()

    def __init__(self, picker: SlidePicker, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.picker = picker
        self.label, self.choose_button = label_and_button(
            self, "Choose store…", "Use another embedding store (a .zarr folder) for this slide"
        )
        self.choose_button.clicked.connect(lambda: self._choose())
        picker.slide_changed.connect(self.refresh)
        STORE_CHANGED.connect(self._store_changed)  # a weak reference: no disconnect needed
        self.refresh()

    def _store_changed(self, fingerprint: str) -> None:
        try:
            ref = self.picker.current_ref()
            if ref is not None and ref.fingerprint == fingerprint:
                self.refresh()
                self.store_changed.emit()  # the panel drops what it showed of the old store
        except RuntimeError:  # this row's Qt object is gone (its dock was closed)
            STORE_CHANGED.disconnect(self._store_changed)

    def refresh(self) -> None:
        """Show which store the chosen slide uses (discovering one if none was chosen)."""
        ref = self.picker.current_ref()
        if ref is None:
            self.label.setText("Embeddings: open a slide first")
            return
        info = session_for(ref).current_store()
        if info is None:
            self.label.setText("Embeddings: none yet; embed this slide with the Embed widget")
            self.label.setToolTip("")
        else:
            self.label.setText(f"Embeddings: {info.label}")
            self.label.setToolTip(str(info.path))

    @guarded
    def use_store(self, path: str | Path) -> None:
        """Use the store at ``path`` for the chosen slide (a notification if it does not fit)."""
        session = self.picker.session()
        session.use_store(path)
        self.refresh()
        self.store_changed.emit()

    def _choose(self) -> None:
        ref = self.picker.current_ref()
        start = str(ref.path.parent) if ref is not None else ""
        folder = QFileDialog.getExistingDirectory(self, "Choose an embedding store (.zarr)", start)
        if folder:
            self.use_store(folder)


def make_table(headers: Sequence[str]) -> QTableWidget:
    """A read-only, row-selecting table with the given column headers."""
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(list(headers))
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.verticalHeader().setVisible(False)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    return table


def fill_table(
    table: QTableWidget, rows: Sequence[Sequence[Any]], swatches: Sequence[str] | None = None
) -> None:
    """Put ``rows`` in ``table``; ``swatches`` (#rrggbb) colour the first cell of each row."""
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            item = QTableWidgetItem(text)
            if isinstance(value, int | float):
                item.setTextAlignment(
                    int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                )
            if c == 0 and swatches is not None and r < len(swatches):
                colour = QColor(swatches[r])
                item.setBackground(colour)
                item.setForeground(QColor("black" if colour.lightness() > 128 else "white"))
            table.setItem(r, c, item)


def table_text(table: QTableWidget) -> list[list[str]]:
    """Every cell's text, row by row (what the user sees)."""
    return [
        [table.item(r, c).text() if table.item(r, c) else "" for c in range(table.columnCount())]
        for r in range(table.rowCount())
    ]


def closing_worker_class():
    # superqt's worker, not napari's subclass: napari's relays every worker exception as a
    # notification with a traceback, while user errors here get one readable line.
    from superqt.utils import GeneratorWorker

    class ClosingGeneratorWorker(GeneratorWorker):
        """A generator worker that closes its generator in the worker thread when it stops.

        superqt's worker just stops iterating when asked to quit; closing the generator here
        runs the job's ``finally`` blocks (flush written batches, finalise the store) in the
        worker thread, not later on whichever thread garbage-collects it.
        """

        def work(self):
            try:
                return super().work()
            finally:
                gen = getattr(self, "_gen", None)
                if gen is not None:
                    gen.close()

    return ClosingGeneratorWorker
