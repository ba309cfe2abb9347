"""Encoders: the registry of image encoders, their checkpoint layouts and the loaded model.

``load_encoder(name, weights=None, device="cpu")`` returns an :class:`Encoder` (a frozen torch
module). ``list_specs()``, ``find_weights()`` and ``model_table()`` describe what is
available. Importing this package imports neither torch nor timm; the names below are
resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EncoderSpec": "registry",
    "ModelStatus": "registry",
    "register": "registry",
    "get_spec": "registry",
    "list_specs": "registry",
    "known_names": "registry",
    "models_dir": "registry",
    "find_weights": "registry",
    "model_table": "registry",
    "MODELS_DIR_ENV": "registry",
    "DefaultModelConfig": "default_model",
    "default_spec": "default_model",
    "read_checkpoint": "checkpoints",
    "weights_sha256": "checkpoints",
    "LAYOUTS": "layouts",
    "Encoder": "encoder",
    "load_encoder": "encoder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_gpfm.encoders' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"napari_gpfm.encoders.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
