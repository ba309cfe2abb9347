"""What machine a benchmark ran on: the facts every bench script prints beside its figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    """Physical memory in GiB, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def report(text: str, out: str | os.PathLike | None) -> None:
    """Print a benchmark's Markdown and append it to ``out`` when given (runs accumulate)."""
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
