"""Parameter groups and AdamW for GPFM (DINOv2 ``param_groups.py`` rules).

Every trainable parameter gets three tags, computed from its name *inside its top-level module*
(``backbone``, ``dino_head``, ``ibot_head`` or ``expert_heads.<name>``):

* ``lr_multiplier = layer_decay ** (depth + 1 - layer_id)``: in the backbone ``pos_embed``,
  ``patch_embed``, ``cls_token`` and ``mask_token`` have ``layer_id`` 0, block ``i`` has ``i + 1``
  and everything else (final norm) ``depth + 1``; heads have ``depth + 1`` (multiplier 1).
  ``patch_embed`` gets an extra ``x patch_embed_lr_mult`` (0.2).
* ``wd_multiplier = 0`` for biases, anything named ``*norm*`` and LayerScale ``gamma``; 1 otherwise
  (so ``pos_embed``, ``cls_token`` and ``mask_token`` are decayed, as in DINOv2).
* ``is_last_layer`` for names containing ``last_layer`` (the DINO head's and the expert heads'
  weight-normed output layers): they follow the last-layer lr schedule (0 in the first epoch).

Parameters with equal tags are fused into one optimizer group. :func:`apply_schedules` sets each
group's ``lr`` and ``weight_decay`` every iteration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "cls_token", "mask_token", "reg_token")
_HEAD_PREFIXES = ("dino_head.", "ibot_head.")


@dataclass(frozen=True)
class ParamTags:
    """The optimizer tags of one named parameter."""

    name: str
    layer_id: int
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _split_module(name: str, backbone_prefix: str) -> tuple[str, str]:
    """``(top-level module, name inside it)`` for a student parameter name."""
    if name.startswith(backbone_prefix):
        return "backbone", name[len(backbone_prefix) :]
    if name.startswith("expert_heads."):
        _, expert, rest = name.split(".", 2)
        return f"expert_heads.{expert}", rest
    for prefix in _HEAD_PREFIXES:
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix) :]
    return "", name


def param_tags(
    name: str,
    depth: int,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    backbone_prefix: str = "backbone.",
) -> ParamTags:
    """The tags of one parameter of the student (names as in ``student.named_parameters()``)."""
    name = _clean(name)
    module, local = _split_module(name, backbone_prefix)
    layer_id = depth + 1
    if module == "backbone":
        if local.split(".", 1)[0] in _EMBEDDING_NAMES:
            layer_id = 0
        elif local.startswith("blocks."):
            layer_id = int(local.split(".")[1]) + 1
    lr_multiplier = layer_decay ** (depth + 1 - layer_id)
    if module == "backbone" and local.startswith("patch_embed"):
        lr_multiplier *= patch_embed_lr_mult
    no_decay = local.endswith(".bias") or local == "bias" or "norm" in local or "gamma" in local
    return ParamTags(
        name=name,
        layer_id=layer_id,
        lr_multiplier=lr_multiplier,
        wd_multiplier=0.0 if no_decay else 1.0,
        is_last_layer="last_layer" in local,
    )


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    depth: int,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """Fused optimizer groups ``{"params", "lr_multiplier", "wd_multiplier", "is_last_layer"}``.

    ``named_parameters`` are the student's (``backbone.*``, ``dino_head.*``, ``expert_heads.*``);
    frozen parameters are skipped. ``depth`` is the number of backbone blocks.
    """
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        tags = param_tags(name, depth, layer_decay, patch_embed_lr_mult, backbone_prefix)
        key = (tags.lr_multiplier, tags.wd_multiplier, tags.is_last_layer)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "lr_multiplier": tags.lr_multiplier,
                "wd_multiplier": tags.wd_multiplier,
                "is_last_layer": tags.is_last_layer,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(
    param_groups: list[dict], betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over the tagged groups; lr and weight decay come from :func:`apply_schedules`."""
    return torch.optim.AdamW(param_groups, lr=0.0, weight_decay=0.0, betas=betas)


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float
) -> None:
    """Set every group's ``lr = (last_layer_lr if last layer else lr) * lr_multiplier`` and
    ``weight_decay = wd * wd_multiplier``."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
