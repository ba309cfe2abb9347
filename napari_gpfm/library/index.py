"""The library index: tile embeddings of many slides in one faiss index, searched as one.

``LibraryIndex.build(stores, out_dir)`` copies each store's L2-normalised features (float16)
and tile coordinates into the library folder and indexes them; ``search(query)`` returns the
most similar tiles of all slides as slide + level-0 box + score, or the best few regions of
each slide with ``group_by_slide=True``. ``add`` / ``remove`` change the slide set; each
change is committed atomically (see :mod:`napari_gpfm.library.layout`).

Index kinds and their trade-offs are described in :mod:`napari_gpfm.library.engine`:
``auto`` searches exactly (``flat``) up to ~2M vectors at D=1024 and uses ``ivfpq`` with
exact re-ranking beyond. Removal uses faiss ``remove_ids`` on the ID-mapped flat and IVF
indexes (no rebuild: the remaining vectors keep their ids and nothing is re-read from the
stores) and rebuilds an HNSW graph from the library's own float16 copies. Those copies also
serve ivfpq's exact re-ranking, re-tuning after a change, and switching an ``auto`` library
to ivfpq when it outgrows flat search, all without reopening the stores.

Staleness. Each slide entry records its store's state (identity, created / updated times,
tile count). :meth:`LibraryIndex.verify` (run by :meth:`open` unless ``verify=False``) raises
:class:`IndexError_` when a store changed since it was added (run ``gpfm index add`` again to
refresh it) or a slide file is gone. A store that was deleted is not an error: the library
keeps its own copy of the vectors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import GPFMError, IndexError_, ParameterError, StoreError, WeightsError
from napari_gpfm.library import layout
from napari_gpfm.library.engine import (
    IVFPQ_MIN_VECTORS,
    KINDS,
    RECALL_K,
    EngineConfig,
    VectorEngine,
    choose_kind,
    exact_top_k,
)
from napari_gpfm.library.rows import RowTable
from napari_gpfm.library.sources import (
    StoreSource,
    check_compatible,
    find_stores,
    stamp_changes,
)

Progress = Callable[[str], None]
# Store rows read (and normalised) at a time while copying a store into the library.
_INGEST_ROWS = 1 << 16
# Extra candidates fetched so that tiles tying at the top_k-th score are ordered by row id
# (the same slide copied twice ties exactly): the best k are then a prefix of the best k + 1.
_TIE_MARGIN = 16
# Rows handed to faiss at a time when filling an index.
_ADD_ROWS = 1 << 17
# Queries drawn from the library itself to tune ivfpq / hnsw search settings.
_TUNE_QUERIES = 64
# Re-tune after the library grew or shrank by more than this fraction since the last tuning.
_RETUNE_CHANGE = 0.10
# Retrain ivfpq when the number of lists planned for the new size is this many times larger.
_RETRAIN_GROWTH = 4


@dataclass(frozen=True)
class LibraryHit:
    """One similar tile: where it is (slide, level-0 box ``x, y, w, h``) and how similar.

    ``rank`` counts from 1 among a query's hits; with grouping, ``slide_rank`` is the rank of
    the hit's slide (slides ordered by their best hit) and hits are listed slide by slide.
    """

    query: int
    rank: int
    score: float
    slide_path: str
    slide_name: str
    slide_fingerprint: str
    tile: int
    x: float
    y: float
    w: float
    h: float
    store_path: str
    slide_rank: int | None = None
    # The level-0 um/px the slide was embedded at (its metadata's, or the one the user gave for
    # a file that records none): reopening the slide with it works for both kinds of file.
    slide_mpp: float | None = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.w, self.h)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_kind(kind: str) -> str:
    if kind not in ("auto", *KINDS):
        raise ParameterError(f"--kind {kind!r}: use auto, {', '.join(KINDS)}")
    return kind


def _source_error(path: Path, exc: GPFMError) -> GPFMError:
    return type(exc)(f"{path}: {exc}") if str(path) not in str(exc) else exc


class LibraryIndex:
    """A searchable library of many slides' tile embeddings; see the module docstring."""

    def __init__(self, path: Path, meta: dict[str, Any], engine: VectorEngine,
                 table: RowTable) -> None:
        self.path = path
        self._meta = meta
        self.engine = engine
        self._table = table

    # ================================================================== opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True,
             mmap: bool = True) -> LibraryIndex:
        """Open a library; the index is memory-mapped read-only unless ``mmap=False``.

        Damaged files raise :class:`IndexError_`; with ``verify`` so do stale entries (see
        :meth:`verify`).
        """
        lib = Path(path).expanduser()
        meta = layout.read_meta(lib)
        library = cls._load(lib, meta, mmap=mmap)
        if verify:
            library.verify()
        return library

    @classmethod
    def _load(cls, lib: Path, meta: dict[str, Any], *, mmap: bool) -> LibraryIndex:
        try:
            config = EngineConfig.from_dict(meta["engine"])
            files = meta["files"]
            slides = meta["slides"]
            if not isinstance(slides, list) or not all(
                isinstance(s, dict) and "id" in s and "first_row" in s for s in slides
            ):
                raise ValueError("bad slide list")
        except (TypeError, ValueError, KeyError) as exc:
            raise IndexError_(
                f"{lib / layout.META_NAME} is corrupted ({exc}); rebuild the library with "
                "`gpfm index build`"
            ) from None
        index_path = layout.check_file(lib, files.get("index"), "the faiss index")
        rows_path = layout.check_file(lib, files.get("rows"), "the row table")
        rows = layout.load_array(rows_path, "the row table", mmap=mmap)
        n_rows = int(meta["n_rows"])
        if rows.dtype != np.int64 or rows.shape != (n_rows, 3):
            raise IndexError_(
                f"{rows_path} is corrupted (shape {rows.shape}, {n_rows} rows expected); "
                "rebuild the library with `gpfm index build`"
            )
        engine = VectorEngine.load(index_path, config, mmap=mmap)
        if engine.ntotal != n_rows:
            raise IndexError_(
                f"{index_path} holds {engine.ntotal} vectors but meta.json lists {n_rows}; "
                "rebuild the library with `gpfm index build`"
            )
        if not mmap:
            rows = np.array(rows)
        return cls(lib, meta, engine, RowTable(lib, slides, rows))

    # ================================================================== building
    @classmethod
    def build(
        cls,
        stores: Iterable[str | os.PathLike],
        out_dir: str | os.PathLike,
        kind: str = "auto",
        *,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> LibraryIndex:
        """Make a library at ``out_dir`` from embedding ``stores`` (stores or folders of them).

        ``kind``: ``auto`` (exact ``flat`` while the float32 vectors fit 8 GiB, ~2M tiles at
        D=1024; ``ivfpq`` beyond), ``flat``, ``ivfpq`` or ``hnsw``; see
        :mod:`napari_gpfm.library.engine` for memory per vector, build time and recall. An
        existing library at ``out_dir`` is replaced only with ``overwrite``.
        """
        _check_kind(kind)
        lib = Path(out_dir).expanduser()
        paths = find_stores(stores)
        old_meta = None
        if lib.exists():
            if layout.is_library(lib):
                if not overwrite:
                    raise ParameterError(
                        f"{lib} already holds a library; add stores with `gpfm index add {lib} "
                        "STORES`, or pass --overwrite to replace it"
                    )
                old_meta = layout.read_meta(lib)
            elif not lib.is_dir() or any(lib.iterdir()):
                raise ParameterError(
                    f"{lib} exists and is not a library; choose another --out (an empty or new "
                    "folder)"
                )
        created = not lib.exists()
        fresh = created or not any(lib.iterdir())
        lib.mkdir(parents=True, exist_ok=True)
        say = progress or (lambda _msg: None)
        try:
            with layout.writer_lock(lib):
                cls._build_locked(lib, paths, kind, old_meta, say)
        except BaseException:
            # Nothing was committed: leave the folder as it was.
            if fresh:
                for child in list(lib.iterdir()):
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
                if created:
                    lib.rmdir()
            elif old_meta is not None:
                layout.collect_garbage(lib, old_meta)
            raise
        return cls.open(lib, verify=False)

    @classmethod
    def _build_locked(cls, lib: Path, paths: list[Path], kind: str,
                      old_meta: dict[str, Any] | None, say: Progress) -> None:
        sources = [StoreSource.open(p) for p in paths]
        first = sources[0]
        for source in sources[1:]:
            check_compatible(source, first.identity, f"a library of {first.path}")
        _refuse_duplicates(sources)
        settings = first.library_settings()
        total = sum(int(source.attrs["n_tiles"]) for source in sources)
        config = EngineConfig.plan(kind, total, int(settings["identity"]["embed_dim"]))
        meta: dict[str, Any] = {
            "format": layout.LIBRARY_FORMAT,
            "format_version": layout.FORMAT_VERSION,
            "created": layout.now(),
            "updated": layout.now(),
            "generation": int(old_meta["generation"]) if old_meta else 0,
            "requested_kind": kind,
            **settings,
            "engine": {},
            "files": {},
            "slides": [],
            "n_rows": 0,
            "next_row_id": 0,
            "next_slide_id": int(old_meta["next_slide_id"]) if old_meta else 1,
        }
        for i, source in enumerate(sources, 1):
            say(f"copying {i}/{len(sources)}: {source.path}")
            meta["slides"].append(cls._ingest(lib, meta, source))
        say(f"indexing {total} tiles of {len(sources)} slides: {config.factory}")
        table = RowTable.of_slides(lib, meta["slides"])
        engine = _index_rows(table, config, say)
        cls._commit(lib, meta, engine, table.rows)

    @staticmethod
    def _ingest(lib: Path, meta: dict[str, Any], source: StoreSource) -> dict[str, Any]:
        """Copy a store's normalised vectors (float16) and coords into a new slide folder."""
        from napari_gpfm.analysis.search import normalize

        slide_id = int(meta["next_slide_id"])
        meta["next_slide_id"] = slide_id + 1
        first_row = int(meta["next_row_id"])
        store = source.store()
        n, dim = store.n_tiles, store.embed_dim
        folder = layout.slide_dir(lib, slide_id)
        if folder.exists():  # left by a process killed before its commit
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        coords_bytes = layout.save_array(folder / "coords.npy", store.all_coords)
        vectors_path = folder / "vectors.npy"
        out = np.lib.format.open_memmap(vectors_path, mode="w+", dtype=np.float16,
                                        shape=(n, dim))
        for start in range(0, n, _INGEST_ROWS):
            rows = np.arange(start, min(n, start + _INGEST_ROWS))
            try:
                out[rows[0]: rows[-1] + 1] = normalize(store.read_features(rows))
            except GPFMError as exc:
                raise _source_error(source.path, exc) from None
        out.flush()
        del out
        vectors_bytes = layout.flush_file(vectors_path)
        meta["next_row_id"] = first_row + n
        record = source.slide_record()
        record.update({
            "id": slide_id,
            "first_row": first_row,
            "files": {
                "coords": {"path": str((folder / "coords.npy").relative_to(lib)),
                           "bytes": coords_bytes},
                "vectors": {"path": str(vectors_path.relative_to(lib)), "bytes": vectors_bytes},
            },
            "added": layout.now(),
        })
        return record

    @staticmethod
    def _commit(lib: Path, meta: dict[str, Any], engine: VectorEngine, rows: np.ndarray) -> None:
        generation = int(meta["generation"]) + 1
        folder = layout.generation_dir(lib, generation)
        if folder.exists():  # left by a process killed before its commit
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        index_path = folder / "index.faiss"
        engine.save(index_path)
        index_bytes = layout.flush_file(index_path)
        rows_bytes = layout.save_array(folder / "rows.npy", rows.astype(np.int64))
        layout.fsync_dir(folder)
        if (lib / layout.SLIDES_DIR).is_dir():
            layout.fsync_dir(lib / layout.SLIDES_DIR)
        meta.update({
            "generation": generation,
            "updated": layout.now(),
            "engine": engine.config.to_dict(),
            "n_rows": int(len(rows)),
            "files": {
                "index": {"path": str(index_path.relative_to(lib)), "bytes": index_bytes},
                "rows": {"path": str((folder / "rows.npy").relative_to(lib)),
                         "bytes": rows_bytes},
            },
        })
        layout.write_meta(lib, meta)
        layout.collect_garbage(lib, meta)

    # ================================================================== changing
    def add(self, stores: Iterable[str | os.PathLike],
            progress: Progress | None = None) -> dict[str, list[str]]:
        """Add stores (or folders of stores); a slide already in the library is replaced
        (which is how a changed store is refreshed). Returns ``{"added": [...],
        "replaced": [...]}`` slide paths.
        """
        paths = find_stores(stores)
        say = progress or (lambda _msg: None)
        with layout.writer_lock(self.path), self._cleanup_on_failure():
            current = self._writable()
            meta = current._meta
            sources = [StoreSource.open(p) for p in paths]
            for source in sources:
                check_compatible(source, meta["identity"], str(self.path))
            _refuse_duplicates(sources)
            # The same slide: same content, or the same store or slide file re-embedded after
            # the slide changed (its fingerprint then differs from the entry's).
            records = [src.slide_record() for src in sources]
            replaced = [s for s in meta["slides"] if any(_same_slide(s, r) for r in records)]
            new_slides = []
            for i, source in enumerate(sources, 1):
                say(f"copying {i}/{len(sources)}: {source.path}")
                new_slides.append(self._ingest(self.path, meta, source))
            kept = [s for s in meta["slides"] if s not in replaced]
            meta["slides"] = kept + new_slides
            current._change(replaced, new_slides, say)
            self._commit(self.path, meta, current.engine, current._table.rows)
        self._reload()
        return {"added": [r["slide_path"] for r in records
                          if not any(_same_slide(s, r) for s in replaced)],
                "replaced": [s["slide_path"] for s in replaced]}

    def remove(self, slides: Sequence[str | os.PathLike],
               progress: Progress | None = None) -> list[str]:
        """Remove slides named by path, file name, fingerprint (or its first 8+ characters)
        or store path; return the removed slides' paths.
        """
        say = progress or (lambda _msg: None)
        with layout.writer_lock(self.path), self._cleanup_on_failure():
            current = self._writable()
            meta = current._meta
            gone = _resolve_slides(meta["slides"], slides, self.path)
            meta["slides"] = [s for s in meta["slides"] if s not in gone]
            current._change(gone, [], say)
            self._commit(self.path, meta, current.engine, current._table.rows)
        self._reload()
        return [s["slide_path"] for s in gone]

    @contextlib.contextmanager
    def _cleanup_on_failure(self) -> Iterator[None]:
        """On an error before the commit, delete the files the change had written."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(GPFMError, OSError):
                layout.collect_garbage(self.path, layout.read_meta(self.path))
            raise

    def _writable(self) -> LibraryIndex:
        """A fresh, fully loaded (not memory-mapped) copy of the library on disk."""
        meta = layout.read_meta(self.path)
        return self._load(self.path, meta, mmap=False)

    def _change(self, removed: list[dict[str, Any]], added: list[dict[str, Any]],
                say: Progress) -> None:
        """Apply removed/added slides to the loaded engine and row table, rebuilding or
        re-tuning the engine when needed."""
        config = self.engine.config
        table, gone = self._table.changed(removed, added)
        n_new = len(table)
        requested = str(self._meta.get("requested_kind", config.kind))
        planned_kind = choose_kind(n_new, config.dim) if requested == "auto" else config.kind
        rebuild = planned_kind != config.kind or (len(gone) > 0 and not self.engine.supports_remove)
        if (config.kind == planned_kind == "ivfpq" and n_new >= IVFPQ_MIN_VECTORS
                and EngineConfig.plan("ivfpq", n_new, config.dim).nlist
                >= _RETRAIN_GROWTH * config.nlist):
            rebuild = True  # far more lists are due: coarse lists would grow too long
        self._table = table
        if rebuild:
            new_config = EngineConfig.plan(planned_kind, n_new, config.dim)
            say(f"rebuilding the index as {new_config.factory} for {n_new} tiles")
            self.engine = _index_rows(table, new_config, say)
            return
        self.engine.remove(gone)
        for record in added:
            _add_slide(self.engine, table, record)
        last = config.tuned_rows or 0
        if config.kind == "flat":
            config.tuned_recall, config.tuned_rows = 1.0, n_new
        elif abs(n_new - last) > _RETUNE_CHANGE * max(last, 1):
            _tune(self.engine, table, say)

    def _reload(self) -> None:
        fresh = self.open(self.path, verify=False)
        self.__dict__.update(fresh.__dict__)

    # ================================================================== checking
    def slide_status(self, content: bool = False) -> list[dict[str, Any]]:
        """Each slide's state: ``ok``, ``slide missing``, ``store changed (...)`` or
        ``store missing`` (harmless: the library keeps its own vectors). ``content`` also
        fingerprints every slide file (reads 2 MiB of each, so not before every search):
        ``slide changed`` when the file now holds another image than the one embedded."""
        from napari_gpfm.slides.slide import file_fingerprint

        out = []
        for s in self._meta["slides"]:
            state = "ok"
            if not s.get("slide_path") or not Path(s["slide_path"]).exists():
                state = "slide missing"
            elif content and file_fingerprint(Path(s["slide_path"])) != s["slide_fingerprint"]:
                state = "slide changed"
            store = Path(s.get("store_path", ""))
            if not store.exists():
                state = "store missing" if state == "ok" else state
            else:
                try:
                    current = StoreSource.open(store)
                except GPFMError as exc:
                    state = f"store changed ({exc})"
                else:
                    changes = stamp_changes(s.get("store_stamp", {}), current.stamp)
                    if changes:
                        state = f"store changed ({', '.join(changes)})"
            out.append({"slide": s["slide_path"], "store": s.get("store_path", ""),
                        "fingerprint": s["slide_fingerprint"], "status": state})
        return out

    def verify(self) -> None:
        """Raise :class:`IndexError_` for the first stale slide: its store changed since it
        was added (fix: ``gpfm index add`` again) or its slide file is missing."""
        for entry in self.slide_status():
            state = entry["status"]
            if state.startswith("store changed"):
                raise IndexError_(
                    f"{entry['store']} (slide {Path(entry['slide']).name}) changed since it "
                    f"was added to {self.path}: run `gpfm index add {self.path} "
                    f"{entry['store']}` again"
                )
            if state == "slide missing":
                raise IndexError_(
                    f"slide {entry['slide']} of library {self.path} is missing (moved or "
                    f"deleted); restore it, or drop it with `gpfm index remove {self.path} "
                    f"{entry['fingerprint'][:12]}`"
                )

    # ================================================================== reading
    def __len__(self) -> int:
        return len(self._table)

    @property
    def dim(self) -> int:
        return int(self.engine.config.dim)

    @property
    def kind(self) -> str:
        return self.engine.config.kind

    @property
    def identity(self) -> dict[str, Any]:
        """Encoder id, weights sha256, tiling id, pooling and embedding size of the library."""
        return dict(self._meta["identity"])

    @property
    def meta(self) -> dict[str, Any]:
        return self._meta

    @property
    def slides(self) -> list[dict[str, Any]]:
        """One record per slide (path, fingerprint, tiles, tile size, store, ...)."""
        return list(self._meta["slides"])

    # ================================================================== searching
    def search(
        self,
        query: np.ndarray,
        top_k: int = 50,
        group_by_slide: bool = False,
        per_slide: int = 3,
        exclude: np.ndarray | None = None,
    ) -> list[LibraryHit] | list[list[LibraryHit]]:
        """The tiles of all slides most similar to ``query`` ``(D,)`` or ``(Q, D)``.

        Without grouping: the ``top_k`` best tiles, best first. With ``group_by_slide``: the
        best ``per_slide`` tiles of each of the ``top_k`` best slides (slides ordered by their
        best tile). ``exclude`` lists row ids never returned (the query's own tiles).
        Returns a list of hits for a ``(D,)`` query, a list of such lists for ``(Q, D)``.
        """
        q = np.asarray(query, dtype=np.float32)
        single = q.ndim == 1
        q = np.atleast_2d(q)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ParameterError(
                f"query of shape {np.asarray(query).shape} does not fit this library's "
                f"{self.dim}-d vectors ({self.identity['encoder_id']}); use the same encoder"
            )
        for name, value in (("top_k", top_k), ("per_slide", per_slide)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ParameterError(f"{name}={value!r} must be a whole number >= 1")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ParameterError("the query vector is zero or not finite; choose another region")
        q = q / norms
        excluded = np.unique(np.asarray(exclude if exclude is not None else [], np.int64))
        n = len(self)
        if group_by_slide:
            results = self._search_grouped(q, int(top_k), int(per_slide), excluded, n)
        else:
            k = min(n, int(top_k) + len(excluded) + _TIE_MARGIN)
            scores, ids = self.engine.search(q, max(k, 1), self._table.fetch)
            results = []
            for qi in range(len(q)):
                keep = (ids[qi] >= 0) & ~np.isin(ids[qi], excluded)
                s, i = scores[qi][keep], ids[qi][keep]
                order = np.lexsort((i, -s))[:top_k]
                results.append(self._hits(qi, s[order], i[order]))
        return results[0] if single else results

    def _search_grouped(self, q: np.ndarray, top_k: int, per_slide: int,
                        excluded: np.ndarray, n: int) -> list[list[LibraryHit]]:
        # Grow the candidate pool until every one of the top_k slides has per_slide tiles in
        # it (or the pool holds everything): a slide's tiles beyond the pool cannot beat it.
        pool = min(n, max(4 * top_k * per_slide, RECALL_K) + len(excluded))
        out: list[list[LibraryHit] | None] = [None] * len(q)
        todo = list(range(len(q)))
        while todo:
            scores, ids = self.engine.search(q[todo], max(pool, 1), self._table.fetch)
            still = []
            for row, qi in enumerate(todo):
                keep = (ids[row] >= 0) & ~np.isin(ids[row], excluded)
                s, i = scores[row][keep], ids[row][keep]
                slides = self._table.rows[self._table.positions(i), 1]
                order, groups = [], {}
                for j, sid in enumerate(slides.tolist()):
                    if sid not in groups:
                        groups[sid] = []
                        order.append(sid)
                    groups[sid].append(j)
                chosen = order[:top_k]
                complete = len(order) >= top_k and all(
                    len(groups[sid]) >= per_slide for sid in chosen
                )
                exhausted = pool >= n or int((ids[row] >= 0).sum()) < pool
                if complete or exhausted:
                    picks, slide_rank = [], []
                    for rank, sid in enumerate(chosen, 1):
                        picks += groups[sid][:per_slide]
                        slide_rank += [rank] * min(per_slide, len(groups[sid]))
                    out[qi] = self._hits(qi, s[picks], i[picks], slide_rank)
                else:
                    still.append(qi)
            todo = still
            pool = min(n, pool * 4)
        return out  # type: ignore[return-value]

    def _hits(self, qi: int, scores: np.ndarray, ids: np.ndarray,
              slide_rank: list[int] | None = None) -> list[LibraryHit]:
        if len(ids) == 0:
            return []
        rows = self._table.rows[self._table.positions(ids)]
        hits = []
        for j, (score, (_, sid, tile)) in enumerate(zip(scores.tolist(), rows.tolist(),
                                                         strict=True)):
            record = self._table.by_id[sid]
            x, y = self._table.coords(sid)[tile].tolist()
            size = float(record["tile_size_l0"])
            hits.append(LibraryHit(
                # float16 copies and float32 sums can put a cosine a hair above 1
                query=qi, rank=j + 1, score=min(1.0, max(-1.0, float(score))),
                slide_path=record["slide_path"], slide_name=record["slide_name"],
                slide_fingerprint=record["slide_fingerprint"], tile=tile,
                x=float(x), y=float(y), w=size, h=size, store_path=record["store_path"],
                slide_rank=slide_rank[j] if slide_rank is not None else None,
                slide_mpp=float(record.get("slide_mpp") or 0.0) or None,
            ))
        return hits

    # ================================================================== queries
    def query_from_store(self, store: str | os.PathLike, roi: Any) -> tuple[np.ndarray,
                                                                             np.ndarray]:
        """The query vector of the tiles of ``store`` inside ``roi`` (level-0 ``(x, y, w, h)``
        rectangle, ``(x, y)`` point or ``(M, 2)`` polygon), and the row ids of those tiles in
        this library (empty when the slide is not in it) to exclude from the results.
        """
        from napari_gpfm.analysis.search import query_vector, tiles_in_roi

        source = StoreSource.open(store)
        check_compatible(source, self.identity, str(self.path))
        handle = source.store()
        indices = tiles_in_roi(handle.all_coords, handle.tile_size_l0, roi)
        vector = query_vector(handle.read_features(indices) if len(indices) else
                              np.zeros((0, self.dim), np.float32), np.arange(len(indices)))
        own = [s for s in self._meta["slides"] if s["slide_fingerprint"] == source.fingerprint]
        exclude = (int(own[0]["first_row"]) + indices if own else np.zeros(0, np.int64))
        return vector, exclude.astype(np.int64)

    def search_roi(self, store: str | os.PathLike, roi: Any, top_k: int = 50,
                   group_by_slide: bool = False, per_slide: int = 3,
                   exclude_query: bool = True) -> list[LibraryHit]:
        """Search with the mean embedding of the tiles of ``store`` inside ``roi``; the ROI's
        own tiles are left out of the results unless ``exclude_query`` is False."""
        vector, own = self.query_from_store(store, roi)
        return self.search(vector, top_k, group_by_slide, per_slide,
                           exclude=own if exclude_query else None)

    def query_from_image(self, image: np.ndarray, weights: str | os.PathLike | None = None,
                         device: str = "auto") -> np.ndarray:
        """Embed an RGB uint8 image ``(H, W, 3)`` with the library's encoder and weights.

        ``weights`` defaults to the file the stores were embedded with (recorded when the
        library was built); a file whose sha256 differs raises :class:`WeightsError`. The
        image is resized to the encoder's input like a tile; it should show tissue at the
        library's magnification (``target_mpp`` um/px).
        """
        import torch

        from napari_gpfm.embedding.engine import BatchForward, resolve_device
        from napari_gpfm.encoders import load_encoder

        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ParameterError(
                f"query image must be RGB uint8 (H, W, 3), got {arr.dtype} {arr.shape}"
            )
        wanted = self.identity["weights_sha256"]
        path = weights if weights is not None else self._meta.get("weights_path") or None
        if path is None or not Path(path).expanduser().is_file():
            raise WeightsError(
                f"library {self.path} was built with encoder {self._meta.get('encoder_name')} "
                f"(weights sha256 {wanted[:12]}); its weights file "
                f"{path or '(not recorded)'} is not here: pass --weights with that file"
            )
        target = resolve_device(device)
        encoder = load_encoder(self._meta["encoder_name"], weights=path, device=target)
        if encoder.weights_sha256 != wanted:
            raise WeightsError(
                f"{path} has sha256 {encoder.weights_sha256[:12]}, but library {self.path} was "
                f"built with weights {wanted[:12]}: pass the weights the stores were made with"
            )
        forward = BatchForward(encoder, target, None, self.identity["pooling"], False, 1, False)
        features, _ = forward(torch.from_numpy(np.array(arr, copy=True)).unsqueeze(0))
        return features[0].float().cpu().numpy()

    # ================================================================== describing
    def info(self, check: bool = True) -> dict[str, Any]:
        """A plain-data summary (kind, encoder, tiling, sizes, each slide and its state)."""
        config = self.engine.config
        meta = self._meta
        in_index, on_disk = config.memory_per_vector()
        files = [self.path / meta["files"][k]["path"] for k in ("index", "rows")]
        files += [self.path / s["files"][k]["path"] for s in meta["slides"]
                  for k in ("coords", "vectors")]
        status = ({e["fingerprint"]: e["status"] for e in self.slide_status(content=True)}
                  if check else {})
        requested = meta.get("requested_kind", config.kind)
        suggested = choose_kind(len(self), config.dim) if requested == "auto" else config.kind
        return {
            "path": str(self.path),
            "created": meta.get("created"),
            "updated": meta.get("updated"),
            "kind": config.kind,
            "requested_kind": requested,
            "suggested_kind": suggested,
            "engine": config.to_dict(),
            "engine_summary": config.describe(),
            "encoder_name": meta.get("encoder_name"),
            **self.identity,
            "target_mpp": meta.get("target_mpp"),
            "weights_path": meta.get("weights_path"),
            "n_slides": len(meta["slides"]),
            "n_vectors": len(self),
            "index_bytes": int(meta["files"]["index"]["bytes"]),
            "disk_bytes": int(sum(f.stat().st_size for f in files if f.exists())),
            "bytes_per_vector_index": in_index,
            "bytes_per_vector_copy": on_disk,
            "slides": [
                {
                    "name": s["slide_name"], "path": s["slide_path"],
                    "fingerprint": s["slide_fingerprint"], "tiles": int(s["n_tiles"]),
                    "store": s["store_path"], "added": s.get("added"),
                    "status": status.get(s["slide_fingerprint"], "not checked"),
                }
                for s in meta["slides"]
            ],
        }


# ---------------------------------------------------------------------- helpers
def _same_slide(entry: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether a store's ``record`` (``StoreSource.slide_record``) replaces the library's slide
    ``entry`` when added."""
    return (entry["slide_fingerprint"] == record["slide_fingerprint"]
            or entry.get("store_path") == record["store_path"]
            or bool(record["slide_path"]) and entry.get("slide_path") == record["slide_path"])


def _add_slide(engine: VectorEngine, table: RowTable, record: dict[str, Any]) -> None:
    first = int(record["first_row"])
    vectors = table.vectors(int(record["id"]))
    for start in range(0, len(vectors), _ADD_ROWS):
        block = np.asarray(vectors[start: start + _ADD_ROWS], dtype=np.float32)
        engine.add(block, first + start + np.arange(len(block), dtype=np.int64))


def _index_rows(table: RowTable, config: EngineConfig, say: Progress) -> VectorEngine:
    """A new engine over every row of ``table``: trained on a sample (ivfpq), filled, tuned."""
    training = None
    if config.kind == "ivfpq":
        size = VectorEngine.training_size(config, len(table))
        say(f"training on {size} of {len(table)} vectors")
        training = table.sample(size, seed=0)
    engine = VectorEngine.create(config, training)
    del training
    for record in table.records:
        _add_slide(engine, table, record)
    _tune(engine, table, say)
    return engine


def _tune(engine: VectorEngine, table: RowTable, say: Progress) -> None:
    """Tune search settings against exact search, querying with the library's own vectors
    (tile embeddings are what ROI queries average)."""
    config = engine.config
    n = engine.ntotal
    if config.kind == "flat" or n == 0:
        config.tuned_recall, config.tuned_rows = 1.0, n
        return
    rng = np.random.default_rng(12345)
    picks = np.sort(rng.choice(n, size=min(_TUNE_QUERIES, n), replace=False))
    queries = table.fetch(table.ids()[picks]).astype(np.float32)
    k = min(RECALL_K, n)
    say(f"tuning {config.kind} for recall@{k} on {len(queries)} queries")
    _, truth = exact_top_k(queries, table.stream(), k)
    engine.tune(queries, truth, table.fetch)
    say(f"tuned: {config.describe()}")


def _refuse_duplicates(sources: list[StoreSource]) -> None:
    seen: dict[str, Path] = {}
    for source in sources:
        if source.fingerprint in seen:
            raise StoreError(
                f"{seen[source.fingerprint]} and {source.path} hold the same slide (fingerprint "
                f"{source.fingerprint[:12]}); pass only one of them"
            )
        seen[source.fingerprint] = source.path


def _resolve_slides(slides: list[dict[str, Any]], names: Sequence[str | os.PathLike],
                    lib: Path) -> list[dict[str, Any]]:
    """The slide records named by path, file name, fingerprint (8+ characters) or store."""
    if not names:
        raise ParameterError("name at least one slide to remove (path, file name or fingerprint)")
    chosen: list[dict[str, Any]] = []
    for raw in names:
        text = str(raw)
        resolved = str(Path(text).expanduser().resolve()) if text else ""
        matches = [
            s for s in slides
            if text == s["slide_fingerprint"]
            or (len(text) >= 8 and s["slide_fingerprint"].startswith(text))
            or resolved in (s["slide_path"], s["store_path"])
            or text == s["slide_name"]
        ]
        if not matches:
            raise ParameterError(
                f"no slide {text!r} in {lib}; name it by path, file name or fingerprint as "
                f"listed by `gpfm index info {lib}`"
            )
        if len(matches) > 1:
            raise ParameterError(
                f"{text!r} names {len(matches)} slides in {lib}; use the fingerprint shown by "
                f"`gpfm index info {lib}`"
            )
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen
