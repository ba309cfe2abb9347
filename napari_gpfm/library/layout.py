"""The library's files on disk, and how a change is committed atomically.

::

    LIB/
      meta.json                  what the library holds (slides, encoder, tiling, engine, files)
      gen-000003/index.faiss     the faiss index; its ids are row ids
      gen-000003/rows.npy        (N, 3) int64: row id, slide id, tile index; sorted by row id
      slides/000007/coords.npy   (n, 2) int64 level-0 top-left of each tile of slide 7
      slides/000007/vectors.npy  (n, D) float16 L2-normalised embeddings of slide 7
      .lock                      present while a process writes the library

A change writes new files only (a new ``gen-*`` folder, new ``slides/*`` folders), flushes
them, then replaces ``meta.json`` in one ``os.replace``: a reader sees the old library or
the new one, never a mix, and a process killed mid-way leaves the old one intact. Files that
no ``meta.json`` names any more are deleted after the commit (and by the next writer if the
process died before). Slide ids are never reused, so a replaced slide gets a new folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import IndexError_

LIBRARY_FORMAT = "napari-gpfm-library"
FORMAT_VERSION = 1
META_NAME = "meta.json"
LOCK_NAME = ".lock"
SLIDES_DIR = "slides"
GEN_PREFIX = "gen-"
_REQUIRED_META = (
    "format", "format_version", "generation", "identity", "engine", "files", "slides",
    "n_rows", "next_row_id", "next_slide_id",
)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def is_library(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding a library's ``meta.json``."""
    meta = Path(path) / META_NAME
    if not meta.is_file():
        return False
    with contextlib.suppress(OSError, ValueError):
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == LIBRARY_FORMAT
    return False


def read_meta(lib: Path) -> dict[str, Any]:
    """Read and check ``meta.json``; any problem raises :class:`IndexError_` naming the fix."""
    path = lib / META_NAME
    if not lib.exists():
        raise IndexError_(f"no library at {lib}; make one with `gpfm index build STORES --out {lib}`")
    if not path.is_file():
        raise IndexError_(
            f"{lib} is not a library (no {META_NAME}); make one with `gpfm index build`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IndexError_(
            f"{path} is corrupted ({type(exc).__name__}); rebuild the library with "
            "`gpfm index build`"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != LIBRARY_FORMAT:
        raise IndexError_(f"{path} is not a napari-gpfm library file; point to a library folder")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise IndexError_(
            f"{lib} was written by a newer napari-gpfm (library format "
            f"{meta.get('format_version')}); upgrade napari-gpfm to read it"
        )
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise IndexError_(
            f"{path} is corrupted (missing {', '.join(missing)}); rebuild the library with "
            "`gpfm index build`"
        )
    return meta


def write_meta(lib: Path, meta: dict[str, Any]) -> None:
    """Replace ``meta.json`` atomically (the commit point of every change)."""
    tmp = lib / f".{META_NAME}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, lib / META_NAME)
    fsync_dir(lib)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (file creations and renames) to disk, where the OS allows."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_array(path: Path, array: np.ndarray) -> int:
    """Write ``array`` as ``.npy``, flushed to disk; return the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    return path.stat().st_size


def flush_file(path: Path) -> int:
    """fsync a file written by another library (faiss); return its size in bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.stat().st_size


def check_file(lib: Path, record: Any, what: str) -> Path:
    """The path of a file named in ``meta.json``, after checking it exists with its size.

    A truncated or missing file raises :class:`IndexError_` before anything reads it (a
    memory-mapped read of a truncated faiss file would crash rather than fail).
    """
    if not isinstance(record, dict) or "path" not in record or "bytes" not in record:
        raise IndexError_(f"{lib / META_NAME} is corrupted (bad entry for {what}); rebuild the "
                          "library with `gpfm index build`")
    path = lib / str(record["path"])
    if not path.is_file():
        raise IndexError_(
            f"{path} is missing ({what}); the library is damaged: rebuild it with "
            "`gpfm index build`"
        )
    size = path.stat().st_size
    if size != int(record["bytes"]):
        raise IndexError_(
            f"{path} is corrupted ({what}: {size} bytes, {record['bytes']} expected, the file "
            "was truncated or overwritten); rebuild the library with `gpfm index build`"
        )
    return path


def load_array(path: Path, what: str, *, mmap: bool = True) -> np.ndarray:
    """``np.load`` without pickles, memory-mapped by default; bad files raise IndexError_."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexError_(
            f"{path} is corrupted ({what}: {type(exc).__name__}); rebuild the library with "
            "`gpfm index build`"
        ) from None


def generation_dir(lib: Path, generation: int) -> Path:
    return lib / f"{GEN_PREFIX}{int(generation):06d}"


def slide_dir(lib: Path, slide_id: int) -> Path:
    return lib / SLIDES_DIR / f"{int(slide_id):06d}"


def collect_garbage(lib: Path, meta: dict[str, Any]) -> None:
    """Delete generation and slide folders (and partial files) that ``meta`` does not name."""
    keep_gen = generation_dir(lib, int(meta["generation"])).name
    for entry in lib.glob(f"{GEN_PREFIX}*"):
        if entry.is_dir() and entry.name != keep_gen:
            shutil.rmtree(entry, ignore_errors=True)
    keep_slides = {slide_dir(lib, int(s["id"])).name for s in meta["slides"]}
    slides = lib / SLIDES_DIR
    if slides.is_dir():
        for entry in slides.iterdir():
            if entry.is_dir() and entry.name not in keep_slides:
                shutil.rmtree(entry, ignore_errors=True)
    for entry in lib.glob(f".{META_NAME}.*.partial"):
        with contextlib.suppress(OSError):
            entry.unlink()


def writer_lock(lib: Path):
    """Hold ``LIB/.lock`` while changing the library, so two writers never interleave.

    A lock left by a process that died on this machine is taken over.
    """
    from napari_gpfm._filelock import exclusive_lock

    return exclusive_lock(lib / LOCK_NAME, lambda owner: IndexError_(
        f"{lib} is being changed by another process ({owner}); wait for it to finish, "
        f"or delete {lib / LOCK_NAME} if that process is gone"
    ))


