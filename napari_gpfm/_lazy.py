"""Lazy re-exports for package ``__init__`` files.

Packages expose their public names without importing the modules behind them, so that
``import napari_gpfm`` (and its subpackages) stays free of torch, zarr, faiss and Qt until a
name is actually used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``.

    ``exports`` maps a public name to the module defining it: a submodule name (``"engine"``)
    or an absolute module path (``"napari_gpfm.tiling.grid"``). A resolved name is cached in
    the package namespace, so each import happens once.
    """
    names = sorted(exports)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        path = module if "." in module else f"{package}.{module}"
        value = getattr(importlib.import_module(path), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__, names
