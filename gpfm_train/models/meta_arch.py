"""GPFM's unified knowledge distillation: DINOv2 self-distillation plus frozen-expert distillation.

:class:`GPFMDistiller` holds

* ``student`` (trained): ``backbone`` (timm ViT with ``mask_token``), ``dino_head`` (shared by the
  DINO and iBOT losses unless ``ibot_separate_head``), and ``expert_heads`` (one
  :class:`~gpfm_train.models.heads.ExpertHead` per expert, no teacher copy);
* ``teacher`` (EMA of the student's backbone and DINO head, no gradients, always in eval mode:
  no drop path);
* the loss modules, whose teacher centers are buffers (saved with the state dict);
* the frozen experts, kept in a plain ``dict`` (:attr:`experts`), *not* registered as submodules.
  So they are absent from ``parameters()``, ``state_dict()`` and ``train()``: DDP/FSDP never sync
  or shard them, checkpoints do not duplicate hundreds of MB of fixed weights, and the optimizer
  never sees them. ``.to()``/``.half()`` on the distiller are forwarded to them, and each forward
  moves an expert to the crops' device if a strategy placed the distiller without ``.to()``.

Batch format (what the data pipeline produces; ``B`` images per rank, ``n_g = 2`` global crops of
``G`` px, ``n_l`` local crops of ``L`` px, patch grid ``h x w = G/p x G/p``, ``N = h * w``)::

    {
      "global_crops": (n_g*B, 3, G, G) float, ImageNet-normalised, crop-major
                      (all first crops, then all second crops),
      "local_crops":  (n_l*B, 3, L, L) float, same normalisation, crop-major,
      "masks":        (n_g*B, N) bool, True = masked (iBOT) patch of a global crop,
      "mask_indices": (M,) long, flat indices of the True entries of masks.flatten(),
      "masks_weight": (M,) float, 1 / (masked patches in that token's image),
      "n_masked_patches": int M,
      "upperbound":   int, upper bound on M (DINOv2's static buffer size; unused here),
    }

:func:`gpfm_train.masking.collate_masks` returns the mask entries in this format.

One step (note section 2.4): the teacher sees the unmasked global crops; its CLS tokens are
swapped by crop so that each student global crop meets the *other* crop; CLS and masked patch
tokens go through the teacher head and are centered (softmax centering, center updated after use)
or Sinkhorn-normalised. The student sees the masked global crops and the local crops; one head
call covers [local CLS, global CLS, masked patch tokens]. Losses:
``dino_local = sum_{local j, teacher c} CE / T``, ``dino_global = CE(global, swapped) * 2 / T``
with ``T = n_g(n_g-1) + max(n_g n_l, 1)`` (18 for 2+8 crops), ``koleo = 0.1 * sum_c KoLeo(student
backbone CLS of crop c)``, ``ibot = iBOT(masked tokens) * 2 / n_g``. Each expert sees the *unmasked*
global crops (the recipe feeds the same ImageNet-normalised 224 px crops to every expert, CONCH
included; :class:`ExpertConfig` can resize / re-normalise per expert, or with ``clean_input`` feed
the batch's ``global_crops_clean``, the same crops before the photometric jitter); its CLS target
is matched by
``expert_head(student global CLS)`` with ``1 - cos`` and, when ``patch_weight`` is set, its patch
grid (bicubically resized to the student grid) by ``expert_head(student patch tokens)`` of all
positions with ``0.9 (1 - cos) + 0.1 SmoothL1``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpfm_train.losses import (
    DINOLoss,
    KoLeoLoss,
    cosine_loss,
    iBOTPatchLoss,
    patch_feature_loss,
)
from gpfm_train.models.heads import DINOHead, ExpertHead
from gpfm_train.models.vit import (
    MASK_TOKEN_KEY,
    backbone_forward,
    interpolate_pos_embed,
    patch_grid,
    set_uniform_drop_path,
    timm_state_dict,
)
from napari_gpfm.errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CENTERING_MODES = ("centering", "sinkhorn_knopp")


@dataclass(frozen=True)
class ExpertConfig:
    """One frozen expert and its loss weights.

    Args:
        name: key of the expert in the ``experts`` mapping given to :class:`GPFMDistiller`.
        cls_weight: weight of ``1 - cos`` between the projected student CLS and the expert CLS.
        patch_weight: weight of the patch-token loss; ``None`` = no patch distillation.
        embed_dim: expert feature size; ``None`` reads ``expert.spec.embed_dim`` or
            ``expert.embed_dim``.
        input_size: resize the global crops to this size (bicubic, antialiased) before the expert;
            ``None`` = feed them as they are (the recipe).
        input_mean, input_std: re-normalise the crops from ``DistillConfig.image_mean/std`` to
            these statistics; ``None`` = keep the ImageNet normalisation (the recipe).
        clean_input: feed the expert the global crops before colour, blur and solarisation
            (the batch's ``global_crops_clean``), so its target is the tile's own appearance
            while the student sees the jittered crop; ``False`` = the crops the student sees
            (the recipe).
    """

    name: str
    cls_weight: float = 1.0
    patch_weight: float | None = None
    embed_dim: int | None = None
    input_size: int | None = None
    input_mean: tuple[float, float, float] | None = None
    input_std: tuple[float, float, float] | None = None
    clean_input: bool = False

    def __post_init__(self) -> None:
        if not self.name or "." in self.name or "/" in self.name:
            raise ConfigError(f"expert name {self.name!r} must be non-empty, without '.' or '/'")
        if self.cls_weight < 0 or (self.patch_weight is not None and self.patch_weight < 0):
            raise ConfigError(f"expert {self.name!r}: loss weights must be >= 0")
        if (self.input_mean is None) != (self.input_std is None):
            raise ConfigError(
                f"expert {self.name!r}: give both input_mean and input_std, or neither"
            )


#: GPFM's experts and weights (note section 3.4). CONCH's patch weight is 0.1 in the official
#: config, but no code path uses it.
RECIPE_EXPERTS = (
    ExpertConfig("uni", cls_weight=1.0, patch_weight=0.25),
    ExpertConfig("phikon", cls_weight=0.5, patch_weight=0.125),
    ExpertConfig("conch", cls_weight=1.0, patch_weight=None),
)


@dataclass(frozen=True)
class DistillConfig:
    """Heads, losses and experts of the distiller; defaults are the GPFM recipe."""

    n_global: int = 2
    n_local: int = 8
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    ibot_separate_head: bool = False
    expert_head_bottleneck_dim: int = 256
    student_temp: float = 0.1
    center_momentum: float = 0.9
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    centering: str = "centering"
    patch_cos_weight: float = 0.9
    patch_smooth_l1_weight: float = 0.1
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    experts: tuple[ExpertConfig, ...] = field(default=RECIPE_EXPERTS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", tuple(self.experts))
        if self.n_global != 2:
            raise ConfigError(
                f"n_global={self.n_global}: the DINO global loss pairs exactly 2 global crops"
            )
        if self.n_local < 0:
            raise ConfigError(f"n_local={self.n_local} must be >= 0")
        if self.centering not in CENTERING_MODES:
            raise ConfigError(f"centering={self.centering!r} must be one of {CENTERING_MODES}")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ConfigError(f"expert names {names} must be unique")
        for key in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DistillConfig:
        """Build from a mapping (e.g. YAML); ``experts`` may be a list of mappings."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown distill option(s) {unknown}; valid: {sorted(known)}")
        values = dict(values)
        if "experts" in values:
            expert_keys = {f.name for f in dataclasses.fields(ExpertConfig)}
            experts = []
            for item in values["experts"]:
                if isinstance(item, ExpertConfig):
                    experts.append(item)
                    continue
                bad = sorted(set(item) - expert_keys)
                if bad:
                    raise ConfigError(
                        f"unknown expert option(s) {bad}; valid: {sorted(expert_keys)}"
                    )
                experts.append(ExpertConfig(**item))
            values["experts"] = tuple(experts)
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def _expert_dim(name: str, expert: nn.Module, cfg: ExpertConfig) -> int:
    if cfg.embed_dim is not None:
        return int(cfg.embed_dim)
    spec = getattr(expert, "spec", None)
    for source in (getattr(spec, "embed_dim", None), getattr(expert, "embed_dim", None)):
        if source is not None:
            return int(source)
    raise ConfigError(
        f"expert {name!r}: cannot tell its feature size; set embed_dim in its ExpertConfig"
    )


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    return None


class GPFMDistiller(nn.Module):
    """Student, EMA teacher, heads, losses and frozen experts of GPFM pretraining.

    Args:
        student_backbone: from :func:`gpfm_train.models.vit.build_student_backbone`; the teacher
            starts as an exact copy (with drop path removed).
        experts: frozen modules by name, one for each ``cfg.experts`` entry; each maps normalised
            images ``(B, 3, S, S)`` to ``{"cls": (B, D), "patch_tokens": (B, h, w, D)}`` and is
            called as ``expert(x, patch_tokens=<bool>)``. They are set to eval mode and
            ``requires_grad=False``.
        cfg: the :class:`DistillConfig`.
    """

    def __init__(
        self,
        student_backbone: nn.Module,
        experts: Mapping[str, nn.Module] | None = None,
        cfg: DistillConfig | None = None,
    ) -> None:
        super().__init__()
        cfg = DistillConfig() if cfg is None else cfg
        experts = {} if experts is None else dict(experts)
        self.cfg = cfg
        if not isinstance(getattr(student_backbone, MASK_TOKEN_KEY, None), nn.Parameter):
            raise ConfigError(
                "student_backbone has no mask_token; build it with build_student_backbone()"
            )
        wanted = [e.name for e in cfg.experts]
        if sorted(experts) != sorted(wanted):
            raise ConfigError(
                f"experts given {sorted(experts)} do not match the configured experts "
                f"{sorted(wanted)}"
            )
        embed_dim = int(student_backbone.embed_dim)

        def dino_head() -> DINOHead:
            return DINOHead(
                embed_dim,
                cfg.out_dim,
                hidden_dim=cfg.head_hidden_dim,
                bottleneck_dim=cfg.head_bottleneck_dim,
                nlayers=cfg.head_nlayers,
            )

        student: dict[str, nn.Module] = {"backbone": student_backbone, "dino_head": dino_head()}
        if cfg.ibot_separate_head:
            student["ibot_head"] = dino_head()
        self._ema_keys = tuple(student)
        expert_heads = {
            e.name: ExpertHead(
                embed_dim, _expert_dim(e.name, experts[e.name], e), cfg.expert_head_bottleneck_dim
            )
            for e in cfg.experts
        }
        student["expert_heads"] = nn.ModuleDict(expert_heads)
        self.student = nn.ModuleDict(student)

        self.teacher = nn.ModuleDict({k: copy.deepcopy(self.student[k]) for k in self._ema_keys})
        set_uniform_drop_path(self.teacher["backbone"], 0.0)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.ibot_loss = iBOTPatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.koleo_loss = KoLeoLoss()

        # Plain dict on purpose: see the module docstring.
        self._experts: dict[str, nn.Module] = {}
        for name, module in experts.items():
            module.requires_grad_(False)
            module.eval()
            self._experts[name] = module

    # ----------------------------------------------------------------- module plumbing
    @property
    def experts(self) -> Mapping[str, nn.Module]:
        """The frozen experts (read-only view; not submodules)."""
        return types.MappingProxyType(self._experts)

    @property
    def embed_dim(self) -> int:
        return int(self.student["backbone"].embed_dim)

    @property
    def depth(self) -> int:
        return len(self.student["backbone"].blocks)

    def train(self, mode: bool = True) -> GPFMDistiller:
        super().train(mode)
        self.teacher.eval()
        for module in self._experts.values():
            module.eval()
        return self

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        super()._apply(fn, recurse)
        for module in self._experts.values():
            module._apply(fn, recurse)
        return self

    def gradient_clip_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters clipped separately in the recipe (3.0 each): the student's backbone and
        DINO (and iBOT) heads. The expert heads are not clipped."""
        return {k: list(self.student[k].parameters()) for k in self._ema_keys}

    # ----------------------------------------------------------------- teacher
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` over backbone and DINO/iBOT heads."""
        teacher_params: list[torch.Tensor] = []
        student_params: list[torch.Tensor] = []
        for key in self._ema_keys:
            teacher_params += list(self.teacher[key].parameters())
            student_params += list(self.student[key].parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    def student_backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Student backbone in timm layout (its mask token: ``student['backbone'].mask_token``)."""
        return timm_state_dict(self.student["backbone"])

    def teacher_backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Teacher (EMA) backbone in timm layout (its mask token:
        ``teacher['backbone'].mask_token``)."""
        return timm_state_dict(self.teacher["backbone"])

    @torch.no_grad()
    def load_backbone_weights(
        self, state_dict: Mapping[str, torch.Tensor], mask_token: torch.Tensor | None = None
    ) -> None:
        """Warm-start the student backbone from timm-layout weights and copy it to the teacher.

        ``mask_token`` (``(1, D)``) may come separately or as a ``mask_token`` key; when absent the
        current one is kept. Weights trained at another ``img_size`` have their position
        embedding resampled to this backbone's grid (DINOv2's rule), so a run can continue at a
        higher resolution, as DINOv2 does in a short phase at the end of pretraining.
        """
        state = dict(state_dict)
        if mask_token is not None:
            state[MASK_TOKEN_KEY] = mask_token.reshape(1, -1)
        backbone = self.student["backbone"]
        state.setdefault(MASK_TOKEN_KEY, backbone.mask_token.detach().clone())
        pos_embed = state.get("pos_embed")
        if (isinstance(pos_embed, torch.Tensor) and pos_embed.ndim == 3
                and pos_embed.shape[-1] == backbone.pos_embed.shape[-1]
                and pos_embed.shape != backbone.pos_embed.shape):
            grid = patch_grid(backbone, tuple(backbone.patch_embed.img_size))
            try:
                state["pos_embed"] = interpolate_pos_embed(pos_embed, grid)
            except ValueError as exc:
                raise WeightsError(f"backbone weights: cannot resample pos_embed ({exc})") from None
        try:
            result = backbone.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches: another width, depth or patch size
            detail = str(exc).strip().splitlines()[-1].strip()
            raise WeightsError(
                f"backbone weights do not fit the student ({detail}); use weights of the same "
                "architecture"
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                f"backbone weights do not fit the student ({len(result.missing_keys)} missing, "
                f"e.g. {result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, e.g. "
                f"{result.unexpected_keys[:3]}); use weights of the same architecture"
            )
        self.teacher["backbone"].load_state_dict(backbone.state_dict())

    # ----------------------------------------------------------------- forward
    def _check_batch(self, batch: Mapping[str, Any]) -> tuple[int, tuple[int, int]]:
        cfg = self.cfg
        global_crops = batch["global_crops"]
        if global_crops.ndim != 4 or global_crops.shape[0] % cfg.n_global:
            raise ConfigError(
                f"global_crops shape {tuple(global_crops.shape)} is not (n_global*B, 3, G, G) "
                f"with n_global={cfg.n_global}"
            )
        batch_size = global_crops.shape[0] // cfg.n_global
        grid = patch_grid(self.student["backbone"], tuple(global_crops.shape[-2:]))
        masks = batch["masks"]
        expected = (global_crops.shape[0], grid[0] * grid[1])
        if tuple(masks.shape) != expected:
            raise ConfigError(
                f"masks shape {tuple(masks.shape)} does not fit the global crops (expected "
                f"{expected}); make the mask grid global_crop_size // patch_size"
            )
        if cfg.n_local:
            local = batch.get("local_crops")
            if local is None or local.shape[0] != cfg.n_local * batch_size:
                got = None if local is None else tuple(local.shape)
                raise ConfigError(
                    f"local_crops shape {got} is not (n_local*B, 3, L, L) with "
                    f"n_local={cfg.n_local}"
                )
        return batch_size, grid

    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: torch.Tensor, mask_indices: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        out = backbone_forward(self.teacher["backbone"], None, global_crops)
        first, second = out["x_norm_clstoken"].chunk(cfg.n_global)
        cls_tokens = torch.cat((second, first))  # student crop 1 meets teacher crop 2 and back
        patch_tokens = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        if cfg.ibot_separate_head:
            cls_logits = self.teacher["dino_head"](cls_tokens)
            patch_logits = self.teacher["ibot_head"](patch_tokens)
        else:
            logits = self.teacher["dino_head"](torch.cat((cls_tokens, patch_tokens)))
            cls_logits, patch_logits = logits.split([cls_tokens.shape[0], patch_tokens.shape[0]])
        if cfg.centering == "centering":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.ibot_loss.update_center(patch_logits)
        else:
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(
                patch_logits, teacher_temp, patch_logits.shape[0]
            )
        return cls_probs.reshape(cfg.n_global, -1, cls_probs.shape[-1]), patch_probs

    def _expert_input(self, global_crops: torch.Tensor, ecfg: ExpertConfig) -> torch.Tensor:
        x = global_crops
        if ecfg.input_mean is not None:
            shape = (1, -1, 1, 1)
            mean_in = x.new_tensor(self.cfg.image_mean).reshape(shape)
            std_in = x.new_tensor(self.cfg.image_std).reshape(shape)
            mean_out = x.new_tensor(ecfg.input_mean).reshape(shape)
            std_out = x.new_tensor(ecfg.input_std).reshape(shape)
            x = (x * std_in + mean_in - mean_out) / std_out
        if ecfg.input_size is not None and tuple(x.shape[-2:]) != (ecfg.input_size,) * 2:
            x = F.interpolate(
                x, size=(ecfg.input_size, ecfg.input_size), mode="bicubic", antialias=True
            )
        return x

    @torch.no_grad()
    def _run_expert(
        self, ecfg: ExpertConfig, global_crops: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        expert = self._experts[ecfg.name]
        device = _module_device(expert)
        if device is not None and device != global_crops.device:
            expert.to(global_crops.device)
        x = self._expert_input(global_crops, ecfg)
        dtype = _module_dtype(expert)
        if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        out = expert(x, patch_tokens=ecfg.patch_weight is not None)
        if not isinstance(out, Mapping) or "cls" not in out:
            raise ConfigError(f"expert {ecfg.name!r} must return a dict with a 'cls' entry")
        if ecfg.patch_weight is not None:
            patches = out.get("patch_tokens")
            if patches is None or patches.ndim != 4:
                raise ConfigError(
                    f"expert {ecfg.name!r} has patch_weight set but returns no (B, h, w, D) "
                    "'patch_tokens'; set patch_weight to None"
                )
        return out

    def forward(self, batch: Mapping[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
        """All loss terms of one step (see the module docstring for ``batch``).

        Returns ``dino_local``, ``dino_global``, ``koleo``, ``ibot``, ``expert/<name>/cls``,
        ``expert/<name>/patch`` (experts with a patch weight) and ``total``. Every term is the
        weighted contribution that enters ``total``, so ``total`` is their sum. The teacher
        centers are updated as a side effect (applied at the next call).
        """
        cfg = self.cfg
        _, grid = self._check_batch(batch)
        global_crops = batch["global_crops"]
        masks = batch["masks"]
        mask_indices = batch["mask_indices"]
        masks_weight = batch["masks_weight"]
        n_masked = mask_indices.shape[0]
        n_images = global_crops.shape[0]

        teacher_cls_probs, teacher_patch_probs = self._teacher_targets(
            global_crops, mask_indices, teacher_temp
        )

        backbone = self.student["backbone"]
        student_global = backbone_forward(backbone, backbone.mask_token, global_crops, masks)
        global_cls = student_global["x_norm_clstoken"]
        global_patches = student_global["x_norm_patchtokens"]
        masked_patches = global_patches.flatten(0, 1).index_select(0, mask_indices)
        if cfg.n_local:
            local_cls = backbone_forward(backbone, None, batch["local_crops"])["x_norm_clstoken"]
        else:
            local_cls = global_cls.new_zeros(0, global_cls.shape[-1])

        if cfg.ibot_separate_head:
            cls_logits = self.student["dino_head"](torch.cat((local_cls, global_cls)))
            local_logits, global_logits = cls_logits.split([local_cls.shape[0], n_images])
            patch_logits = self.student["ibot_head"](masked_patches)
        else:
            logits = self.student["dino_head"](torch.cat((local_cls, global_cls, masked_patches)))
            local_logits, global_logits, patch_logits = logits.split(
                [local_cls.shape[0], n_images, n_masked]
            )

        n_terms = cfg.n_global * (cfg.n_global - 1) + max(cfg.n_global * cfg.n_local, 1)
        losses: dict[str, torch.Tensor] = {}
        if cfg.n_local:
            dino_local = self.dino_loss(local_logits.chunk(cfg.n_local), list(teacher_cls_probs))
            losses["dino_local"] = cfg.dino_loss_weight * dino_local / n_terms
        else:
            losses["dino_local"] = global_logits.new_zeros(())
        dino_global = self.dino_loss([global_logits], [teacher_cls_probs.flatten(0, 1)])
        losses["dino_global"] = cfg.dino_loss_weight * dino_global * 2 / n_terms
        losses["koleo"] = cfg.koleo_loss_weight * sum(
            self.koleo_loss(chunk) for chunk in global_cls.chunk(cfg.n_global)
        )
        ibot = self.ibot_loss.forward_masked(
            patch_logits,
            teacher_patch_probs,
            masks,
            n_masked_patches=n_masked,
            masks_weight=masks_weight,
        )
        losses["ibot"] = cfg.ibot_loss_weight * ibot * 2 / cfg.n_global

        for ecfg in cfg.experts:
            expert_crops = global_crops
            if ecfg.clean_input:
                expert_crops = batch.get("global_crops_clean")
                if expert_crops is None or expert_crops.shape != global_crops.shape:
                    raise ConfigError(
                        f"expert {ecfg.name!r} reads the clean global crops (clean_input) but "
                        "the batch has none that match its global crops; set "
                        "data.crops.clean_global_crops: true"
                    )
            target = self._run_expert(ecfg, expert_crops)
            head = self.student["expert_heads"][ecfg.name]
            cls_pred = head(global_cls)
            cls_target = target["cls"].reshape(n_images, -1)
            if cls_target.shape[-1] != cls_pred.shape[-1]:
                raise ConfigError(
                    f"expert {ecfg.name!r} returns {cls_target.shape[-1]}-d features but its head "
                    f"has {cls_pred.shape[-1]}; fix embed_dim"
                )
            losses[f"expert/{ecfg.name}/cls"] = ecfg.cls_weight * cosine_loss(cls_pred, cls_target)
            if ecfg.patch_weight is not None:
                patch_pred = head(global_patches)
                losses[f"expert/{ecfg.name}/patch"] = ecfg.patch_weight * patch_feature_loss(
                    patch_pred,
                    target["patch_tokens"],
                    grid,
                    cos_weight=cfg.patch_cos_weight,
                    smooth_l1_weight=cfg.patch_smooth_l1_weight,
                )
        losses["total"] = torch.stack([v.float() for v in losses.values()]).sum()
        return losses
