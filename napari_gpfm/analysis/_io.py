"""Atomic file output for the analysis writers.

A map, a probe or a GeoJSON file is either fully written or not there at all: a crash or a
full disk half-way through must not leave a truncated file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from napari_gpfm.errors import ParameterError


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once, at import, not while threads write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def check_output_path(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, raising ParameterError if a file cannot be written there
    (missing or read-only folder, a folder at that path), before any work is done."""
    out = _checked_place(path, what)
    # Try it now, not after the work: a read-only or virtual folder (/proc) accepts the checks
    # of _checked_place and refuses the file.
    _temporary_file(out, what).unlink()
    return out


def prepare_output_path(path: str | os.PathLike, what: str) -> Path:
    """:func:`check_output_path` for an output whose folder is made when missing."""
    out = Path(path).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(
            f"cannot write {what} to {out}: cannot make the folder {out.parent} "
            f"({exc.strerror or exc}); choose another place"
        ) from None
    return check_output_path(out, what)


def _checked_place(path: str | os.PathLike, what: str) -> Path:
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ParameterError(
            f"cannot write {what} to {out}: the folder {parent} does not exist; create it first"
        )
    if out.is_dir():
        raise ParameterError(f"cannot write {what} to {out}: it is a folder; give a file name")
    return out


def _temporary_file(out: Path, what: str) -> Path:
    """A new empty file beside ``out`` with the permissions of a normal file."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise ParameterError(
            f"cannot write {what} to {out}: {exc.strerror or exc}; choose a folder you can write to"
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); give the result the permissions of a normal file.
    os.chmod(tmp, 0o666 & ~_UMASK)
    return tmp


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the destination folder so that ``os.replace`` is a rename on
    the same file system (atomic on POSIX and Windows).
    """
    out = _checked_place(path, what)
    tmp = _temporary_file(out, what)  # fails, with the same message, where no file can go
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_output(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
