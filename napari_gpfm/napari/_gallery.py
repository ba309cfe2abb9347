"""Qt pieces of the library search in the Similar regions panel: library row, results gallery.

The work is elsewhere: :func:`napari_gpfm.library.gallery.gallery_search` (search + thumbnails,
run here in a worker thread) and :mod:`._gallery_nav` (open or switch to a hit's slide and
frame the hit). This module only shows what they produce and forwards clicks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QColor, QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QListView,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_gpfm.errors import GPFMError
from napari_gpfm.library.gallery import (
    THUMBNAIL_PX,
    GalleryHits,
    GalleryStage,
    Thumbnail,
    gallery_search,
)
from napari_gpfm.napari._gallery_nav import go_to_hit
from napari_gpfm.napari._qt_common import (
    closing_worker_class,
    guarded,
    label_and_button,
    notify_error,
)
from napari_gpfm.napari._slide_view import switcher_for

if TYPE_CHECKING:
    from napari_gpfm.library.query import SearchOptions

HIT_ROLE = int(Qt.ItemDataRole.UserRole)
PENDING_GREY = "#d9d9d9"
FAILED_GREY = "#8c8c8c"


class LibraryRow(QWidget):
    """The library to search (a folder made by ``gpfm index build``) and what it holds."""

    library_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path: Path | None = None
        self.label, self.choose_button = label_and_button(
            self, "Choose library…", "A library folder made by `gpfm index build`"
        )
        self.label.setText("Library: none chosen")
        self.choose_button.clicked.connect(lambda: self._choose())

    @guarded
    def set_library(self, path: str | os.PathLike) -> None:
        """Use the library at ``path``; a folder that is not one is refused with a message."""
        from napari_gpfm.library import layout
        from napari_gpfm.library.query import describe_tiling

        folder = Path(path).expanduser()
        meta = layout.read_meta(folder)  # one-line IndexError_ naming the folder and the fix
        self.path = folder
        self.label.setText(
            f"Library: {folder.name} · {len(meta.get('slides') or [])} slides, "
            f"{meta.get('n_rows', 0)} tiles · {meta.get('encoder_name') or '?'} · "
            f"{describe_tiling(meta.get('tiling') or {})}"
        )
        self.label.setToolTip(str(folder))
        self.library_changed.emit()

    def _choose(self) -> None:
        start = str(self.path.parent) if self.path is not None else ""
        folder = QFileDialog.getExistingDirectory(self, "Choose a library folder", start)
        if folder:
            self.set_library(folder)


def _icon(image: np.ndarray | None, size: int, fill: str) -> QIcon:
    if image is None:
        pixmap = QPixmap(size, size)
        pixmap.fill(QColor(fill))
        return QIcon(pixmap)
    rgb = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = rgb.shape[:2]
    # QImage reads the numpy buffer in place: copy() detaches it before `rgb` goes away.
    qimage = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QIcon(QPixmap.fromImage(qimage))


class GalleryView(QListWidget):
    """Hits as a scrollable grid of thumbnails captioned with slide name and score."""

    hit_clicked = Signal(int)

    def __init__(self, thumbnail_px: int = THUMBNAIL_PX, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.thumbnail_px = thumbnail_px
        self.hits: list[Any] = []
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)
        self.setIconSize(QSize(thumbnail_px, thumbnail_px))
        self.setGridSize(QSize(thumbnail_px + 16, thumbnail_px + 44))
        self.setWordWrap(True)
        self.setUniformItemSizes(True)
        self.setSelectionMode(QListWidget.SelectionMode.SingleSelection)
        self.setToolTip("Click a thumbnail to go to that region (its slide opens if needed)")
        self.itemClicked.connect(self._clicked)

    def show_hits(self, hits: list[Any]) -> None:
        """One item per hit, in order, with a grey placeholder until its thumbnail arrives."""
        self.clear()
        self.hits = list(hits)
        metrics = self.fontMetrics()
        for index, hit in enumerate(self.hits):
            name = metrics.elidedText(hit.slide_name, Qt.TextElideMode.ElideMiddle,
                                      self.thumbnail_px - 8)
            item = QListWidgetItem(_icon(None, self.thumbnail_px, PENDING_GREY),
                                   f"{name}\n{hit.score:.3f}")
            item.setData(HIT_ROLE, index)
            item.setTextAlignment(int(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop))
            slide_rank = f", slide {hit.slide_rank}" if hit.slide_rank is not None else ""
            item.setToolTip(
                f"#{hit.rank}{slide_rank} · similarity {hit.score:.4f}\n{hit.slide_path}\n"
                f"level-0 box x {hit.x:.0f}, y {hit.y:.0f}, {hit.w:.0f} x {hit.h:.0f} px"
            )
            self.addItem(item)

    def set_thumbnail(self, thumb: Thumbnail) -> None:
        item = self.item(thumb.index)
        if item is None:
            return
        fill = FAILED_GREY if thumb.image is None else PENDING_GREY
        item.setIcon(_icon(thumb.image, self.thumbnail_px, fill))
        if thumb.error:
            item.setToolTip(f"{item.toolTip()}\nno thumbnail: {thumb.error}")

    def _clicked(self, item: QListWidgetItem) -> None:
        index = item.data(HIT_ROLE)
        if index is not None:
            self.hit_clicked.emit(int(index))


class LibraryResults(QWidget):
    """Runs a library search in a worker thread and shows its hits; a click goes to a hit."""

    message = Signal(str)

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker: Any = None
        self.last_hits: GalleryHits | None = None
        self.thumbnails: dict[int, Thumbnail] = {}
        self.switcher = switcher_for(viewer)  # shared with the other panels
        self._provenance: dict[str, Any] = {}
        self._failure: str | None = None

        self.gallery = GalleryView()
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.progress_bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.gallery, 1)

        self.cancel_button.clicked.connect(lambda: self.cancel())
        self.gallery.hit_clicked.connect(lambda index: self.go_to(index))

    @property
    def is_busy(self) -> bool:
        return self.worker is not None

    # ------------------------------------------------------------------ running
    def start(self, library_path: Path, store: Path, roi: Any, options: SearchOptions,
              provenance: dict[str, Any]) -> None:
        """Search ``library_path`` with the tiles of ``store`` inside ``roi`` (in a worker)."""
        from napari.qt.threading import create_worker

        if self.is_busy:
            return
        self.gallery.show_hits([])
        self.last_hits = None
        self.thumbnails = {}
        self._failure = None
        self._provenance = {"library": str(library_path), "query_store": str(store),
                            **provenance}
        self.progress_bar.setRange(0, 0)  # busy until the hits are known
        self.cancel_button.setEnabled(True)
        # The closing worker runs the job's `finally` (closing the slides) in the worker thread.
        self.worker = create_worker(
            gallery_search, library_path, store, roi, options, self.gallery.thumbnail_px,
            _worker_class=closing_worker_class(),
            _connect={"yielded": self._on_event, "errored": self._on_error,
                      "finished": self._on_finished},
        )

    def cancel(self) -> None:
        """Stop after the thumbnail being read; the hits shown so far stay."""
        if self.worker is None:
            return
        self.message.emit("Stopping…")
        self.worker.quit()
        self.cancel_button.setEnabled(False)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, GalleryStage):
            self.message.emit(event.message)
        elif isinstance(event, GalleryHits):
            self.last_hits = event
            self._provenance.update(event.info)
            self.gallery.show_hits(event.hits)
            self.progress_bar.setRange(0, max(len(event.hits), 1))
            self.progress_bar.setValue(0)
        elif isinstance(event, Thumbnail):
            self.thumbnails[event.index] = event
            self.gallery.set_thumbnail(event)
            self.progress_bar.setValue(len(self.thumbnails))

    def _on_error(self, exc: BaseException) -> None:
        if not isinstance(exc, GPFMError):
            raise exc  # a bug: napari shows it with its traceback
        self._failure = str(exc)
        notify_error(exc)

    def _on_finished(self) -> None:
        self.worker = None
        self.cancel_button.setEnabled(False)
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)
        self.message.emit(self._summary())

    def _summary(self) -> str:
        if self._failure is not None:
            return f"Library search failed: {self._failure}"
        if self.last_hits is None:
            return "Library search stopped."
        found = self.last_hits
        n = len(found.hits)
        if n == 0:
            return f"No similar tiles in {found.library_path.name}."
        slides = len({h.slide_fingerprint for h in found.hits})
        failed = sum(1 for t in self.thumbnails.values() if t.image is None)
        text = (f"{n} similar tiles from {slides} slide(s) of {found.library_path.name} "
                f"({found.n_slides} slides, {found.n_tiles} tiles); click one to go there")
        if len(self.thumbnails) < n:
            text += f" (stopped: {len(self.thumbnails)} of {n} thumbnails read)"
        if failed:
            text += f" ({failed} thumbnail(s) unreadable: see their tooltips)"
        return text

    # ------------------------------------------------------------------ going to a hit
    @guarded
    def go_to(self, index: int) -> None:
        """Show hit ``index`` (0-based): open or switch to its slide, outline and frame it."""
        hits = self.gallery.hits
        if not 0 <= index < len(hits):
            return
        hit = hits[index]
        go_to_hit(self.viewer, hit, self.switcher, self._provenance)
        self.gallery.setCurrentRow(index)
        self.message.emit(
            f"#{hit.rank} of the library search: {hit.slide_name}, similarity {hit.score:.3f}"
        )
