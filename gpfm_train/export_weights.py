"""Teacher export: timm layout, and the DINOv2/GPFM release layout (``GPFM.pth``).

The release checkpoint is ``{"teacher": {"backbone.<key>": ..., "dino_head.<key>": ...}}``. With
``block_chunks=c`` (4 in GPFM) DINOv2 keys block ``i`` as
``backbone.blocks.<i // (depth // c)>.<i>.*`` (the chunk index, then the *global* block index);
the other backbone keys (``cls_token``, ``pos_embed``, ``mask_token``, ``patch_embed.proj.*``,
``norm.*``, and per block ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) have the timm names. The DINO head's weight-normed
layer uses the legacy ``last_layer.weight_g`` / ``weight_v`` names. Such a file loads with the
official strict loader and through napari_gpfm's ``gpfm`` registry entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gpfm_train.models.heads import from_legacy_weight_norm_keys, to_legacy_weight_norm_keys
from gpfm_train.models.vit import MASK_TOKEN_KEY
from napari_gpfm.errors import ParameterError, WeightsError

if TYPE_CHECKING:
    from gpfm_train.models.meta_arch import GPFMDistiller

_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def teacher_to_timm_state_dict(distiller: GPFMDistiller) -> dict[str, torch.Tensor]:
    """The EMA teacher backbone as a CPU timm state dict (no ``mask_token``)."""
    return _cpu_copy(distiller.teacher_backbone_state_dict())


def _depth(timm_sd: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in timm_sd if (m := _TIMM_BLOCK.match(k))}
    return max(indices) + 1 if indices else 0


def to_gpfm_release_layout(
    timm_sd: dict[str, torch.Tensor],
    block_chunks: int = 4,
    dino_head_sd: dict[str, torch.Tensor] | None = None,
    mask_token: torch.Tensor | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Convert a timm ViT state dict (+ optional DINO head and mask token) to the release layout.

    Args:
        timm_sd: timm ``VisionTransformer`` keys (``blocks.<i>.*``...).
        block_chunks: DINOv2's FSDP chunking (4 for GPFM; 0 keeps ``blocks.<i>.*``).
        dino_head_sd: a :class:`~gpfm_train.models.heads.DINOHead` state dict, stored under
            ``dino_head.*`` with legacy weight-norm names.
        mask_token: ``(1, D)``; zeros when ``None`` (the official loader requires the key, and
            inference never uses it).
    """
    if block_chunks < 0:
        raise ParameterError(f"block_chunks={block_chunks} must be >= 0")
    depth = _depth(timm_sd)
    chunk_size = depth // block_chunks if block_chunks else 0
    if block_chunks and chunk_size == 0:
        raise ParameterError(
            f"block_chunks={block_chunks} exceeds the {depth} blocks of the backbone; "
            f"use at most {depth}"
        )
    teacher: dict[str, torch.Tensor] = {}
    for key, value in timm_sd.items():
        if key == MASK_TOKEN_KEY:
            continue
        match = _TIMM_BLOCK.match(key)
        if match and block_chunks:
            index = int(match.group(1))
            key = f"blocks.{index // chunk_size}.{index}.{match.group(2)}"
        teacher[f"backbone.{key}"] = value
    if mask_token is None:
        mask_token = torch.zeros(
            1, timm_sd["cls_token"].shape[-1], dtype=timm_sd["cls_token"].dtype
        )
    teacher[f"backbone.{MASK_TOKEN_KEY}"] = mask_token.reshape(1, -1)
    if dino_head_sd is not None:
        for key, value in to_legacy_weight_norm_keys(dict(dino_head_sd)).items():
            teacher[f"dino_head.{key}"] = value
    return {"teacher": teacher}


@dataclass(frozen=True)
class ReleaseWeights:
    """A release checkpoint split back into our layouts."""

    backbone: dict[str, torch.Tensor]
    dino_head: dict[str, torch.Tensor] | None
    mask_token: torch.Tensor | None


def from_gpfm_release_layout(checkpoint: dict) -> ReleaseWeights:
    """Inverse of :func:`to_gpfm_release_layout` (also reads the official ``GPFM.pth`` dict).

    Chunked ``blocks.<c>.<i>.*`` keys become ``blocks.<i>.*``; the DINO head gets the
    parametrised weight-norm names back.
    """
    teacher = checkpoint.get("teacher") if isinstance(checkpoint, dict) else None
    if not isinstance(teacher, dict):
        raise WeightsError(
            "checkpoint has no 'teacher' dict; expected the DINOv2/GPFM release layout"
        )
    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    mask_token = None
    for key, value in teacher.items():
        if key.startswith("backbone."):
            local = key[len("backbone.") :]
            if local == MASK_TOKEN_KEY:
                mask_token = value
                continue
            match = _CHUNKED_BLOCK.match(local)
            if match:
                local = f"blocks.{match.group(2)}.{match.group(3)}"
            backbone[local] = value
        elif key.startswith("dino_head."):
            head[key[len("dino_head.") :]] = value
    if not backbone:
        raise WeightsError("checkpoint 'teacher' has no 'backbone.*' keys; not a GPFM/DINOv2 file")
    return ReleaseWeights(
        backbone, from_legacy_weight_norm_keys(head) if head else None, mask_token
    )


def teacher_release_checkpoint(
    distiller: GPFMDistiller, block_chunks: int = 4
) -> dict[str, dict[str, torch.Tensor]]:
    """The distiller's teacher (backbone, mask token, DINO head) in the release layout, on CPU."""
    teacher = distiller.teacher
    return to_gpfm_release_layout(
        teacher_to_timm_state_dict(distiller),
        block_chunks=block_chunks,
        dino_head_sd=_cpu_copy(teacher["dino_head"].state_dict()),
        mask_token=teacher["backbone"].mask_token.detach().to("cpu", copy=True),
    )
