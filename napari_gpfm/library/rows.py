"""The library's rows: which slide and tile each faiss id is, and each slide's own files.

Row ids are int64 and never reused; a slide's rows are consecutive ids from its
``first_row``, its tile ``t`` being row ``first_row + t``. The table ``(N, 3)`` holds
``row id, slide id, tile index`` sorted by row id, so an id is found by binary search.
Each slide keeps ``coords.npy`` (level-0 tile top-lefts) and ``vectors.npy`` (its
normalised embeddings in float16), both memory-mapped on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import IndexError_
from napari_gpfm.library import layout
from napari_gpfm.library.engine import advise_random

# Rows streamed at a time (exact ground truth, rebuilding an index).
STREAM_ROWS = 1 << 17
_REBUILD_HINT = "rebuild the library with `gpfm index build`"


def slide_rows(record: dict[str, Any]) -> np.ndarray:
    """The ``(n, 3)`` block of a slide: row id, slide id, tile index."""
    n = int(record["n_tiles"])
    ids = int(record["first_row"]) + np.arange(n, dtype=np.int64)
    return np.column_stack([ids, np.full(n, int(record["id"]), np.int64),
                            np.arange(n, dtype=np.int64)])


class RowTable:
    """Rows of a library folder ``lib`` holding ``slides`` (their meta.json records)."""

    def __init__(self, lib: Path, slides: list[dict[str, Any]], rows: np.ndarray) -> None:
        self.lib = lib
        self.records = list(slides)
        self.by_id = {int(s["id"]): s for s in slides}
        self.rows = rows
        self._vectors: dict[int, np.ndarray] = {}
        self._coords: dict[int, np.ndarray] = {}

    @classmethod
    def of_slides(cls, lib: Path, slides: list[dict[str, Any]]) -> RowTable:
        """The table of ``slides`` in order (each slide's rows consecutive)."""
        blocks = [slide_rows(s) for s in slides]
        rows = np.concatenate(blocks) if blocks else np.zeros((0, 3), np.int64)
        return cls(lib, slides, rows)

    def __len__(self) -> int:
        return int(len(self.rows))

    def ids(self) -> np.ndarray:
        return self.rows[:, 0]

    def changed(self, removed: list[dict[str, Any]],
                added: list[dict[str, Any]]) -> tuple[RowTable, np.ndarray]:
        """The table without the ``removed`` slides and with the ``added`` ones, and the row
        ids that went away."""
        gone = np.isin(self.rows[:, 1], [int(s["id"]) for s in removed])
        blocks = [self.rows[~gone]] + [slide_rows(s) for s in added]
        kept = [s for s in self.records if s not in removed]
        table = RowTable(self.lib, kept + list(added), np.concatenate(blocks))
        return table, self.rows[gone, 0]

    # ------------------------------------------------------------------ per slide files
    def vectors(self, slide_id: int) -> np.ndarray:
        """``(n, D)`` float16 normalised vectors of a slide (memory-mapped)."""
        if slide_id not in self._vectors:
            record = self.by_id[slide_id]
            path = layout.check_file(self.lib, record["files"]["vectors"], "slide vectors")
            vectors = advise_random(layout.load_array(path, "slide vectors"))
            if vectors.ndim != 2 or vectors.shape[0] != int(record["n_tiles"]):
                raise IndexError_(f"{path} is corrupted (shape {vectors.shape}); "
                                  f"{_REBUILD_HINT}")
            self._vectors[slide_id] = vectors
        return self._vectors[slide_id]

    def coords(self, slide_id: int) -> np.ndarray:
        """``(n, 2)`` int64 level-0 top-left of each tile of a slide."""
        if slide_id not in self._coords:
            record = self.by_id[slide_id]
            path = layout.check_file(self.lib, record["files"]["coords"], "tile coordinates")
            coords = layout.load_array(path, "tile coordinates")
            if coords.shape != (int(record["n_tiles"]), 2):
                raise IndexError_(f"{path} is corrupted (shape {coords.shape}); "
                                  f"{_REBUILD_HINT}")
            self._coords[slide_id] = coords
        return self._coords[slide_id]

    # ------------------------------------------------------------------ by row id
    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions in the table of row ``ids``; an unknown id means a damaged library."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.rows[:, 0], ids), max(len(self.rows) - 1, 0))
        if len(self.rows) == 0 or np.any(self.rows[pos, 0] != ids):
            raise IndexError_(
                f"the index of {self.lib} returned ids missing from its row table; "
                f"{_REBUILD_HINT}"
            )
        return pos

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """float16 vectors of row ``ids`` (what re-ranking and tuning read)."""
        pos = self.positions(ids)
        slide_ids, tiles = self.rows[pos, 1], self.rows[pos, 2]
        out = np.empty((len(pos), self.dim), dtype=np.float16)
        for sid in np.unique(slide_ids):
            sel = slide_ids == sid
            out[sel] = self.vectors(int(sid))[tiles[sel]]
        return out

    @property
    def dim(self) -> int:
        return int(self.vectors(int(self.records[0]["id"])).shape[1]) if self.records else 0

    def stream(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(row ids, float16 vectors)`` of every row, slide by slide, in chunks."""
        for record in self.records:
            ids = slide_rows(record)[:, 0]
            vectors = self.vectors(int(record["id"]))
            for start in range(0, len(ids), STREAM_ROWS):
                yield ids[start: start + STREAM_ROWS], vectors[start: start + STREAM_ROWS]

    def sample(self, size: int, seed: int) -> np.ndarray:
        """``size`` rows drawn uniformly without replacement, float32."""
        picks = np.sort(np.random.default_rng(seed).choice(len(self), size=size, replace=False))
        return self.fetch(self.rows[picks, 0]).astype(np.float32)
