"""Builders: callables that return an encoder backbone with no pretrained weights.

Every backbone follows timm's feature protocol (``forward_features``, ``forward_head`` with
``pre_logits=True``, ``num_prefix_tokens``), so :class:`~napari_gpfm.encoders.encoder.Encoder`
drives timm models and the CONCH vision tower the same way. torch and timm are imported when a
model is built, so the registry can describe encoders without them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class TimmBuilder:
    """Build ``timm.create_model(architecture, pretrained=False, **kwargs)``.

    ``kwargs`` is a tuple of ``(name, value)`` pairs so the builder stays hashable. The extra
    keyword ``layer_norm_eps`` swaps timm's LayerNorm (eps 1e-6) for one with that eps.
    """

    architecture: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> nn.Module:
        import timm
        from torch import nn

        kwargs = dict(self.kwargs)
        eps = kwargs.pop("layer_norm_eps", None)
        if eps is not None:
            kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=float(eps))
        return timm.create_model(self.architecture, pretrained=False, **kwargs)


@dataclass(frozen=True)
class ConchBuilder:
    """Build CONCH's image tower: ViT-B/16 trunk + attention-pooled contrastive projection."""

    image_size: int = 448

    def __call__(self) -> nn.Module:
        from napari_gpfm.encoders.conch import ConchVisionTower

        return ConchVisionTower(image_size=self.image_size)


@dataclass(frozen=True)
class ArchitectureShape:
    """What a built backbone looks like, read without allocating its weights."""

    embed_dim: int
    token_dim: int
    patch_size: int | None
    patch_grid: int | None
    input_size: int
    pretrained_cfg: dict[str, Any]


def instantiate_on_meta(builder: Any) -> nn.Module | None:
    """Build on the meta device (no memory, no init cost); None if the model cannot be."""
    import torch

    try:
        with torch.device("meta"):
            return builder()
    except Exception:  # some architectures compute values from tensors in __init__
        return None


def describe_timm_architecture(builder: TimmBuilder) -> ArchitectureShape:
    """Read embed/token dims, patch size and input size of a timm architecture."""
    model = instantiate_on_meta(builder)
    if model is None:
        model = builder()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    kwargs = dict(builder.kwargs)
    token_dim = int(model.num_features)
    embed_dim = int(getattr(model, "head_hidden_size", None) or token_dim)

    patch_size: int | None = None
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "patch_size"):
        patch_size = int(_first(patch_embed.patch_size))
    elif getattr(model, "feature_info", None):
        patch_size = int(model.feature_info[-1]["reduction"])

    if "img_size" in kwargs:
        input_size = int(_first(kwargs["img_size"]))
    elif patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        input_size = int(_first(patch_embed.img_size))
    else:
        input_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    grid = input_size // patch_size if patch_size else None
    return ArchitectureShape(embed_dim, token_dim, patch_size, grid, input_size, cfg)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value
