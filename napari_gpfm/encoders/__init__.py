"""Encoders: the registry of image encoders, their checkpoint layouts and the loaded model.

``load_encoder(name, weights=None, device="cpu")`` returns an :class:`Encoder` (a frozen torch
module). ``list_specs()``, ``find_weights()`` and ``model_table()`` describe what is
available. Importing this package imports neither torch nor timm; the names below are
resolved on first use.
"""

from __future__ import annotations

from napari_gpfm._lazy import lazy_exports

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

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
