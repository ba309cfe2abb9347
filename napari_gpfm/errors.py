"""Errors a user can cause, each carrying one readable line.

Everything the user can get wrong (a path, a file, a parameter, a weights file, a store)
raises a subclass of :class:`GPFMError`. Its message names the thing and says what to do.
The CLI prints ``error: <message>`` and exits with code 2; the napari widgets show the
message as a notification. Anything else that escapes is a bug in napari-gpfm.
"""

from __future__ import annotations


class GPFMError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2


class SlideError(GPFMError):
    """A slide file cannot be opened or read (missing, not a slide, truncated, no MPP...)."""


class ParameterError(GPFMError):
    """A parameter value is out of range or inconsistent with the others."""


class WeightsError(GPFMError):
    """A weights file is missing, unsafe, or does not fit the requested encoder."""


class EncoderNotFoundError(GPFMError):
    """No encoder of that name is registered."""


class StoreError(GPFMError):
    """An embedding store is missing, corrupted, or was made with another identity."""


class ConfigError(GPFMError):
    """A configuration or manifest file is invalid."""


class TrainingError(GPFMError):
    """Training cannot go on (the loss diverged to NaN or infinity)."""


class IndexError_(GPFMError):
    """A library index is missing, corrupted or stale (named to avoid shadowing IndexError)."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to
    ``limit`` characters: the detail a one-line error quotes from a library's exception."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system failure no check foresaw (a full disk, a read-only or
    virtual folder, a file where a folder should be): what failed, where, what to check."""
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    return (f"{what}: {where}; check that the path exists, is a file or a folder as expected, "
            "and that you may write there") if where else f"{what}; check the paths given"
