"""Shared test fixtures.

Viewer tests need an X display with OpenGL: pytest-xvfb starts Xvfb and Qt draws through xcb
(Qt's offscreen platform has no OpenGL, so napari's canvas would render black).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

# Mesa's software OpenGL (Xvfb) loads libLLVM; Triton, which torch._dynamo imports through timm,
# segfaults when it loads after that. Import it first, before any viewer test draws.
with contextlib.suppress(ImportError):  # the core tests run without the model stack too
    import timm  # noqa: F401


TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# Test helper modules (slide_factory, ...) import by name from the tests folder.
sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(scope="session")
def sample_slide_path() -> Path:
    from napari_gpfm.data.sample import sample_slide_path

    return sample_slide_path()


@pytest.fixture(scope="session")
def extra_he_dir() -> Path:
    return REPO_ROOT / "data" / "extra-he"


@pytest.fixture
def messages():
    """The texts of the napari notifications shown during a test (errors the user sees)."""
    from napari.utils.notifications import notification_manager

    seen: list[str] = []

    def collect(notification):
        seen.append(str(notification.message))

    notification_manager.notification_ready.connect(collect)
    yield seen
    notification_manager.notification_ready.disconnect(collect)
