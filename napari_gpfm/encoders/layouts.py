"""Checkpoint layouts: find the state dict in a loaded file, name its layout, convert it.

Every layout converts to the backbone's own ``state_dict()`` key layout (called ``timm``):

- ``timm``: already the backbone's keys (timm models; our exports).
- ``dinov2``: DINOv2 training output, e.g. GPFM's release ``{'teacher': {'backbone.*',
  'dino_head.*'}}``. Blocks may be chunked for FSDP as ``blocks.<chunk>.<i>.*`` with ``i`` the
  global block index (GPFM: 4 chunks of 6); ``mask_token`` and the heads are dropped.
- ``hf-vit``: a Hugging Face ``transformers`` ``ViTModel`` state dict (Phikon), optionally
  under ``vit.``; separate query/key/value projections are concatenated into timm's ``qkv``.
- ``conch``: CONCH's CoCa checkpoint; the image tower under ``visual.*`` is kept (minus the
  captioning pooler), the text towers are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_gpfm.errors import WeightsError

LAYOUTS: dict[str, str] = {
    "timm": "the encoder's own (timm) keys",
    "dinov2": "DINOv2 training checkpoint ({'teacher': {'backbone.*', 'dino_head.*'}})",
    "hf-vit": "Hugging Face transformers ViTModel state dict",
    "conch": "CONCH CoCa checkpoint (visual.trunk.*, visual.attn_pool_contrast.*)",
}

# Wrapper keys seen around state dicts, in the order they are tried.
_WRAPPERS = ("teacher", "state_dict", "model", "model_state_dict", "module", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


class StateDict:
    """A flat ``name -> tensor`` mapping plus the wrapper keys it was found under."""

    def __init__(self, tensors: dict[str, Any], wrappers: tuple[str, ...]) -> None:
        self.tensors = tensors
        self.wrappers = wrappers


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def unwrap(obj: Any, path: Path) -> StateDict:
    """Find the state dict inside what a checkpoint file held."""
    wrappers: list[str] = []
    while isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and _is_tensor(v)}
        if tensors and len(tensors) >= len(obj) / 2:
            return StateDict(_strip_common_prefixes(tensors), tuple(wrappers))
        inner = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        wrappers.append(inner)
        obj = obj[inner]
    top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"weights file {path} holds no state dict of tensors (found {top}); "
        "pass a checkpoint that stores model weights"
    )


def _strip_common_prefixes(tensors: dict[str, Any]) -> dict[str, Any]:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if tensors and all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
    return tensors


def detect_layout(state: StateDict) -> str:
    """Name the layout of ``state`` (one of :data:`LAYOUTS`)."""
    keys = list(state.tensors)
    if "teacher" in state.wrappers or any(
        k.startswith(("backbone.", "teacher.backbone."))
        or k == "mask_token"
        or _CHUNKED_BLOCK.match(k)
        for k in keys
    ):
        return "dinov2"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf-vit"
    if any(k.startswith(("visual.trunk.", "visual.attn_pool_contrast.")) for k in keys) or (
        any(k.startswith("trunk.") for k in keys)
        and any(k.startswith("attn_pool_contrast.") for k in keys)
    ):
        return "conch"
    return "timm"


def convert(state: StateDict, layout: str, path: Path) -> dict[str, Any]:
    """Convert ``state`` from ``layout`` to the backbone's key layout."""
    if layout == "timm":
        return dict(state.tensors)
    if layout == "dinov2":
        return _from_dinov2(state.tensors, path)
    if layout == "hf-vit":
        return _from_hf_vit(state.tensors)
    if layout == "conch":
        return _from_conch(state.tensors)
    raise ValueError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")


def _from_dinov2(tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    # A full training checkpoint holds student and teacher: the teacher (EMA) is the release.
    for prefix in ("teacher.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key == "mask_token":
            continue  # used only by iBOT masking during training
        chunked = _CHUNKED_BLOCK.match(key)
        name = f"blocks.{chunked.group(2)}.{chunked.group(3)}" if chunked else key
        if name in out:
            raise WeightsError(
                f"weights file {path} has two tensors for {name!r} after un-chunking the "
                "DINOv2 blocks; the file is not a valid DINOv2 checkpoint"
            )
        out[name] = value
    return out


def _from_hf_vit(tensors: dict[str, Any]) -> dict[str, Any]:
    import torch

    if any(k.startswith("vit.") for k in tensors):
        tensors = {k[len("vit.") :]: v for k, v in tensors.items() if k.startswith("vit.")}
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("pooler.") or key == "embeddings.mask_token":
            continue  # not part of last_hidden_state
        if key in _HF_TOP_NAMES:
            out[_HF_TOP_NAMES[key]] = value
            continue
        layer = _HF_LAYER.match(key)
        if layer is None:
            out[key] = value  # left as is: reported as unexpected by check_fit
            continue
        index, rest = layer.groups()
        part, _, param = rest.rpartition(".")
        if part in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
        ):
            qkv.setdefault((index, param), {})[part.rsplit(".", 1)[1]] = (key, value)
        elif part in _HF_BLOCK_NAMES:
            out[f"blocks.{index}.{_HF_BLOCK_NAMES[part]}.{param}"] = value
        else:
            out[key] = value
    for (index, param), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat(
                [parts["query"][1], parts["key"][1], parts["value"][1]], dim=0
            )
        else:  # incomplete: keep the originals so the mismatch report names them
            out.update(dict(parts.values()))
    return out


def _from_conch(tensors: dict[str, Any]) -> dict[str, Any]:
    if any(k.startswith("visual.") for k in tensors):
        tensors = {k[len("visual.") :]: v for k, v in tensors.items() if k.startswith("visual.")}
    return {
        k: v for k, v in tensors.items() if not k.startswith(("attn_pool_caption.", "ln_caption."))
    }


def check_fit(
    expected: Mapping[str, Any],
    converted: Mapping[str, Any],
    *,
    path: Path,
    layout: str,
    encoder: str,
) -> None:
    """Raise one :class:`WeightsError` unless ``converted`` matches ``expected`` key for key.

    ``expected`` maps names to tensors (or anything with ``.shape``) of the built backbone.
    The message names the layout, the missing and unexpected keys (first 5 of each, with
    counts) and every shape mismatch (first 5, with count).
    """
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [
        f"{k}: file {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({abridge(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({abridge(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({abridge(mismatched)})")
    raise WeightsError(
        f"weights file {path} (read as layout '{layout}': {LAYOUTS.get(layout, layout)}) does "
        f"not fit encoder '{encoder}': {'; '.join(problems)}; pass the checkpoint made for "
        f"'{encoder}' or choose the matching encoder"
    )


def abridge(items: list[str], head: int = 5) -> str:
    """``a, b, ... 3 more``: a one-line list of names (the first ``head``)."""
    shown = ", ".join(items[:head])
    return shown + (f", ... {len(items) - head} more" if len(items) > head else "")
