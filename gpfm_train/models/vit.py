"""The student/teacher backbone: a plain timm ``VisionTransformer`` plus DINOv2's iBOT mask token.

GPFM trains a DINOv2 ``vit_large`` (patch 14, 224 px, LayerScale 1e-5, GELU MLP, no registers,
uniform drop path 0.4). timm's ``vit_large_patch14_dinov2`` has the same parameters under the same
names, so the backbone stays a timm model and exporting it to timm is a key filter.

Two things differ from timm's own ``forward_features`` and are handled by :func:`backbone_forward`:

* iBOT masking: masked patch embeddings are replaced by ``mask_token`` *before* the CLS token
  and the position embedding are added (DINOv2 ``prepare_tokens_with_masks``).
* Position-embedding interpolation for crops other than ``img_size`` (the 98 px local crops):
  DINOv2 resizes the 16x16 grid bicubically with ``scale_factor=(n + 0.1) / 16`` and no
  antialiasing, whereas timm's ``dynamic_img_size`` path uses ``size=n`` with antialiasing.
  The two differ numerically, so the DINOv2 rule is reimplemented here. At the native size no
  interpolation happens and both forwards are identical.

The mask token is registered on the timm module itself as ``vit.mask_token`` (shape ``(1, D)``,
zeros, like DINOv2), which gives the DINOv2 state-dict key ``mask_token`` next to the timm keys;
:func:`timm_state_dict` drops it again.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_gpfm.errors import ConfigError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

#: DINOv2 adds this to the target grid size before computing the interpolation scale factor.
DINOV2_INTERPOLATE_OFFSET = 0.1
#: Name of the iBOT mask-token parameter registered on the timm module.
MASK_TOKEN_KEY = "mask_token"


def build_student_backbone(
    arch: str = "vit_large_patch14_dinov2",
    img_size: int = 224,
    drop_path_rate: float = 0.4,
    *,
    init_values: float = 1e-5,
    **kw: Any,
) -> VisionTransformer:
    """Build a randomly initialised timm ViT in DINOv2 shape with an iBOT ``mask_token``.

    Args:
        arch: any timm ``VisionTransformer`` name with a class token and no register tokens,
            e.g. ``vit_large_patch14_dinov2`` (the GPFM recipe) or ``vit_small_patch14_dinov2``.
        img_size: size of the global crops; fixes the position-embedding grid (224 -> 16x16).
        drop_path_rate: stochastic depth, the same for every block (DINOv2 ``drop_path_uniform``),
            not timm's linear ramp.
        init_values: LayerScale initial value (DINOv2 uses 1e-5).
        **kw: further ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``num_heads``...).

    Returns:
        The timm module, with ``dynamic_img_size=True`` (other crop sizes work) and an extra
        parameter ``mask_token`` of shape ``(1, embed_dim)``.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(f"drop_path_rate={drop_path_rate} is outside [0, 1); use e.g. 0.4")
    try:
        vit = timm.create_model(
            arch,
            pretrained=False,
            img_size=img_size,
            num_classes=0,
            dynamic_img_size=True,
            init_values=init_values,
            drop_path_rate=0.0,
            **kw,
        )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(
                f"arch={arch!r} is not a timm model; use e.g. 'vit_large_patch14_dinov2'"
            ) from exc
        raise
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"arch={arch!r} is not a timm VisionTransformer; use a ViT architecture")
    if vit.cls_token is None or vit.num_reg_tokens or vit.no_embed_class or vit.pos_embed is None:
        raise ConfigError(
            f"arch={arch!r} needs a class token, a position embedding that covers it and no "
            "register tokens (DINOv2 layout); use e.g. 'vit_large_patch14_dinov2'"
        )
    if not isinstance(vit.patch_drop, nn.Identity):
        raise ConfigError(f"arch={arch!r}: patch dropout would break iBOT masks; remove it")
    set_uniform_drop_path(vit, drop_path_rate)
    vit.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim, device=vit.cls_token.device))
    return vit


def set_uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """Give every block the same stochastic-depth rate (0 removes it)."""
    from timm.layers import DropPath

    for index, block in enumerate(vit.blocks):
        if not (hasattr(block, "drop_path1") and hasattr(block, "drop_path2")):
            raise ConfigError(
                f"block {index} ({type(block).__name__}) has no drop_path1/drop_path2; "
                "use a standard timm ViT block"
            )
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def patch_grid(vit: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The patch-token grid ``(h, w)`` the backbone produces for images of size ``image_hw``."""
    ph, pw = vit.patch_embed.patch_size
    return image_hw[0] // ph, image_hw[1] // pw


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """DINOv2's position-embedding resampling for a ``grid_hw`` token grid.

    ``pos_embed`` is ``(1, 1 + M*M, D)`` (CLS first, square ``M x M`` grid). The patch part is
    resized bicubically with ``scale_factor = (n + 0.1) / M`` per axis, without antialiasing, in
    float32, and cast back to the input dtype.
    """
    n_patch = pos_embed.shape[1] - 1
    side = math.isqrt(n_patch)
    if side * side != n_patch:
        raise ValueError(f"pos_embed grid of {n_patch} tokens is not square")
    h, w = grid_hw
    if (h, w) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (
        (h + DINOV2_INTERPOLATE_OFFSET) / side,
        (w + DINOV2_INTERPOLATE_OFFSET) / side,
    )
    patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patch_pos.shape[-2:]) != (h, w):
        raise ValueError(f"pos_embed resampled to {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


def backbone_forward(
    vit: nn.Module,
    mask_token: torch.Tensor | None,
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the backbone the DINOv2 way and return the final-LayerNorm tokens.

    Args:
        vit: a backbone from :func:`build_student_backbone` (or any timm ViT with a class token).
        mask_token: ``(1, D)`` token that replaces masked patch embeddings; ``None`` uses
            ``vit.mask_token``. Ignored when ``masks`` is ``None``.
        images: ``(B, 3, H, W)`` normalised images; ``H, W`` multiples of the patch size.
        masks: optional ``(B, N)`` (or ``(B, h, w)``) bool, True = replace that patch.

    Returns:
        ``{"x_norm_clstoken": (B, D), "x_norm_patchtokens": (B, N, D)}``.
    """
    batch = images.shape[0]
    x = vit.patch_embed(images)
    if x.ndim == 4:  # dynamic_img_size -> NHWC
        grid = (x.shape[1], x.shape[2])
        x = x.flatten(1, 2)
    else:
        grid = patch_grid(vit, (images.shape[-2], images.shape[-1]))
    if masks is not None:
        if mask_token is None:
            mask_token = vit.mask_token
        masks = masks.reshape(batch, -1)
        if masks.shape[1] != x.shape[1]:
            raise ValueError(
                f"masks cover {masks.shape[1]} patches but the images give {x.shape[1]}"
            )
        x = torch.where(masks.unsqueeze(-1), mask_token.to(x.dtype).unsqueeze(0), x)
    x = torch.cat((vit.cls_token.expand(batch, -1, -1).to(x.dtype), x), dim=1)
    x = x + interpolate_pos_embed(vit.pos_embed, grid)
    x = vit.pos_drop(x)
    x = vit.norm_pre(x)
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    x = vit.norm(x)
    return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1:]}


def timm_state_dict(vit: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict in plain timm layout (``mask_token`` dropped)."""
    return {k: v for k, v in vit.state_dict().items() if k != MASK_TOKEN_KEY}
