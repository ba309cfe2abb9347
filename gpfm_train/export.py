"""``gpfm-train export``: the EMA teacher of a training checkpoint as a usable encoder.

* ``timm`` layout (default): ``<out>.safetensors`` with the teacher backbone's timm keys, and
  ``<out>.json`` beside it, the :class:`napari_gpfm.encoders.DefaultModelConfig` description
  (timm architecture + keyword arguments, preprocessing, field of view, sizes) that
  ``napari_gpfm.encoders.load_encoder("default", weights=<out>.safetensors)`` reads. Exporting
  to ``napari_gpfm/encoders/weights/default.safetensors`` (the default ``--out``) makes it the
  embedded default model.
* ``gpfm-release`` layout: ``{"teacher": {"backbone.*", "dino_head.*"}}`` with FSDP-chunked block
  keys, the format of GPFM's ``GPFM.pth`` (``torch.save``; only tensors, so it loads with
  ``weights_only=True``), readable by the official loader and napari_gpfm's ``gpfm`` entry.
* ``card=True`` also writes ``<out>.md``, a short model card.

A teacher holding NaN or infinity (a run that diverged) is refused, whatever the layout; the
``.safetensors`` export carries the sha256 of its tensor data, which loading verifies.

Checkpoints are read with ``torch.load(weights_only=True)``: nothing in them is unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_gpfm.analysis._io import atomic_output, atomic_write_text
from napari_gpfm.encoders.checkpoints import non_finite_tensors
from napari_gpfm.encoders.layouts import abridge
from napari_gpfm.errors import ParameterError, WeightsError, first_line

LAYOUTS = ("timm", "gpfm-release")
_TEACHER_PREFIX = "distiller.teacher."
_MASK_TOKEN = "mask_token"


@dataclass(frozen=True)
class TrainingCheckpoint:
    """What export needs from a ``gpfm-train fit`` checkpoint."""

    path: Path
    backbone: dict[str, Any]  # timm layout, mask token removed
    mask_token: Any
    dino_head: dict[str, Any]
    model_config: dict[str, Any]
    data_config: dict[str, Any]
    global_step: int


def read_training_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """Read the teacher and the run configuration from a Lightning checkpoint of ``fit``."""
    import torch

    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsError(
            f"{path} is a folder (a sharded FSDP checkpoint); train with the default "
            "state_dict_type 'full' or convert it with Lightning's "
            "convert_zero_checkpoint_to_fp32_state_dict / torch.distributed.checkpoint first"
        )
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path} is not a readable training checkpoint ({first_line(exc, 200)}); pass a .ckpt "
            "written by gpfm-train fit"
        ) from None
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not any(k.startswith(_TEACHER_PREFIX) for k in state):
        raise WeightsError(
            f"{path} holds no GPFM teacher (no '{_TEACHER_PREFIX}*' weights); pass a checkpoint "
            "written by gpfm-train fit"
        )
    backbone, head = {}, {}
    mask_token = None
    for key, value in state.items():
        if not key.startswith(_TEACHER_PREFIX):
            continue
        local = key[len(_TEACHER_PREFIX):]
        if local.startswith("backbone."):
            name = local[len("backbone."):]
            if name == _MASK_TOKEN:
                mask_token = value
            else:
                backbone[name] = value.contiguous()
        elif local.startswith("dino_head."):
            head[local[len("dino_head."):]] = value.contiguous()
    broken = non_finite_tensors(backbone)
    if broken:
        raise WeightsError(
            f"the teacher in {path} (step {int(ckpt.get('global_step', 0))}) holds NaN or "
            f"infinite values in {len(broken)} tensor(s) ({abridge(broken)}): the run diverged "
            "before this checkpoint; export an earlier one (checkpoints/gpfm-step=*.ckpt)"
        )
    return TrainingCheckpoint(
        path=path,
        backbone=backbone,
        mask_token=mask_token,
        dino_head=head,
        model_config=dict(ckpt.get("hyper_parameters") or {}),
        data_config=dict(ckpt.get("datamodule_hyper_parameters") or {}),
        global_step=int(ckpt.get("global_step", 0)),
    )


def encoder_description(ckpt: TrainingCheckpoint) -> Any:
    """The ``DefaultModelConfig`` that rebuilds the exported backbone with timm."""
    from napari_gpfm.encoders import DefaultModelConfig

    backbone_cfg = dict(ckpt.model_config.get("backbone") or {})
    if "arch" not in backbone_cfg:
        raise WeightsError(
            f"{ckpt.path} does not record its backbone configuration (hyper_parameters); "
            "export a checkpoint written by gpfm-train fit"
        )
    distill = dict(ckpt.model_config.get("distill") or {})
    tiling = dict(ckpt.data_config.get("tiling") or {})
    img_size = int(backbone_cfg.get("img_size", 224))
    kwargs = {
        "img_size": img_size,
        "init_values": float(backbone_cfg.get("init_values", 1e-5)),
        **dict(backbone_cfg.get("kwargs") or {}),
    }
    embed_dim = int(ckpt.backbone["cls_token"].shape[-1])
    patch = ckpt.backbone["patch_embed.proj.weight"].shape[-1]
    return DefaultModelConfig(
        architecture=str(backbone_cfg["arch"]),
        embed_dim=embed_dim,
        model_kwargs=kwargs,
        input_size=img_size,
        mean=tuple(distill.get("image_mean", (0.485, 0.456, 0.406))),
        std=tuple(distill.get("image_std", (0.229, 0.224, 0.225))),
        interpolation="bicubic",
        native_mpp=float(tiling.get("mpp", 0.5)),
        native_read_size=_native_field(tiling, dict(ckpt.data_config.get("crops") or {}), img_size),
        display_name=f"GPFM-style ViT ({backbone_cfg['arch']}, gpfm_train teacher)",
        notes=(
            f"EMA teacher of {ckpt.path.name} at step {ckpt.global_step}, exported by "
            f"gpfm-train export on {_dt.date.today().isoformat()}"
        ),
        patch_size=int(patch),
        token_dim=embed_dim,
    )


def _native_field(tiling: dict[str, Any], crops: dict[str, Any], img_size: int) -> int:
    """Pixels (at the tiling's mpp) that the largest global view covered: the field to embed.

    The recipe's largest global view is the whole tile (scale up to 1.0), so this is the
    tile's read size. A run that reads a wider field and draws smaller views from it (views of
    neighbouring tissue) saw tissue at the size of those views, not of the field.
    """
    from gpfm_train.data.augment import MultiCropConfig

    read_size = int(tiling.get("read_size", img_size))
    scale = crops.get("global_crops_scale") or MultiCropConfig.global_crops_scale
    return max(1, round(read_size * math.sqrt(min(1.0, float(scale[1])))))


def _model_card(ckpt: TrainingCheckpoint, description: Any, weights: Path, layout: str) -> str:
    model = ckpt.model_config
    experts = [e.get("name") for e in model.get("experts") or []]
    schedule = dict(model.get("schedule") or {})
    crops = dict(ckpt.data_config.get("crops") or {})
    lines = [
        f"# {description.display_name}",
        "",
        f"Weights: `{weights.name}` ({layout} layout). Exported {_dt.date.today().isoformat()} "
        f"from `{ckpt.path.name}` (global step {ckpt.global_step}).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{description.architecture}` {json.dumps(description.model_kwargs)} |",
        f"| embedding | {description.embed_dim}-d CLS token after the final LayerNorm |",
        f"| input | {description.input_size} px, {description.interpolation}, mean "
        f"{list(description.mean)}, std {list(description.std)} |",
        f"| field of view | {description.native_read_size} px at {description.native_mpp} um/px |",
        f"| training | DINOv2 (DINO + iBOT + KoLeo) self-distillation"
        f"{' + expert distillation from ' + ', '.join(experts) if experts else ''} |",
        f"| schedule | {schedule.get('epochs')} x {schedule.get('epoch_length')} iterations, "
        f"base lr {schedule.get('base_lr')} |",
        f"| crops | 2 x {crops.get('global_crops_size')} px global, "
        f"{crops.get('local_crops_number')} x {crops.get('local_crops_size')} px local |",
        "",
        "Load it with `napari_gpfm.encoders.load_encoder(\"default\", weights=...)` (the JSON "
        "beside the weights describes the model) or `gpfm embed --model default --weights ...`.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ExportResult:
    """Files written by :func:`export_teacher`."""

    weights: Path
    description: Path | None
    card: Path | None
    layout: str


def export_teacher(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    layout: str = "timm",
    card: bool = False,
    block_chunks: int = 4,
) -> ExportResult:
    """Write the teacher of ``checkpoint`` to ``out`` in ``layout`` (see the module docstring).

    ``block_chunks`` applies to the release layout (GPFM: 4; a depth it does not divide gets
    plain ``blocks.<i>`` keys).
    """
    import torch

    from gpfm_train.export_weights import to_gpfm_release_layout
    from napari_gpfm.encoders.checkpoints import TIMM_METADATA, safetensors_bytes

    if layout not in LAYOUTS:
        raise ParameterError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    out = Path(out).expanduser()
    ckpt = read_training_checkpoint(checkpoint)
    description = encoder_description(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = None
    if layout == "timm":
        if out.suffix != ".safetensors":
            raise ParameterError(f"--out {out}: the timm layout is written as .safetensors")
        # Serialised here and written into a temporary file of our own (unique, with a normal
        # file's permissions: save_file recreates its file 0600), renamed once complete.
        with atomic_output(out, "exported weights") as tmp:
            tmp.write_bytes(safetensors_bytes(ckpt.backbone, TIMM_METADATA))
        json_path = description.write(out.with_suffix(".json"))
    else:
        if out.suffix not in (".pth", ".pt"):
            raise ParameterError(
                f"--out {out}: the gpfm-release layout is a torch file; name it .pth"
            )
        depth = 1 + max(int(k.split(".")[1]) for k in ckpt.backbone if k.startswith("blocks."))
        chunks = block_chunks if block_chunks and depth % block_chunks == 0 else 0
        release = to_gpfm_release_layout(
            ckpt.backbone, block_chunks=chunks, dino_head_sd=ckpt.dino_head,
            mask_token=ckpt.mask_token,
        )
        with atomic_output(out, "exported weights") as tmp:
            torch.save(release, tmp)
    card_path = None
    if card:
        card_path = out.with_suffix(".md")
        atomic_write_text(card_path, _model_card(ckpt, description, out, layout), "model card")
    return ExportResult(out, json_path, card_path, layout)


__all__ = [
    "ExportResult",
    "LAYOUTS",
    "TrainingCheckpoint",
    "encoder_description",
    "export_teacher",
    "read_training_checkpoint",
]
