"""The Lightning module of GPFM pretraining: one :class:`GPFMDistiller`, trained step by step.

Optimisation is **manual** (``automatic_optimization = False``), because one GPFM iteration is
not "loss, backward, step": every step

1. sets each optimizer group's lr / weight decay (and the last-layer lr) and the teacher
   temperature and momentum from the per-iteration schedules at ``global_step``;
2. runs the distiller (teacher targets, student, experts) and back-propagates ``total``
   (``manual_backward``, so Lightning's precision plugin scales fp16 losses);
3. steps the optimizer; Lightning's precision plugin unscales the gradients first and then
   calls :meth:`on_before_optimizer_step`, where the student backbone and the DINO/iBOT heads are
   clipped to norm 3.0 *each* (``GPFMDistiller.gradient_clip_groups``; the expert heads are not
   clipped, as in the recipe);
4. updates the EMA teacher with the scheduled momentum.

A run that diverges stops before NaN reaches the weights: a non-finite loss (checked after 2,
all ranks deciding together) or, without fp16's GradScaler, which skips such steps itself,
non-finite gradient norms (checked in 3) raise a one-line :class:`TrainingError` naming the
step, the loss terms and the lr; the checkpoints saved so far stay clean to resume from.

Every loss term (``loss/<term>``), ``lr``, ``wd``, ``last_layer_lr``, ``momentum`` and
``teacher_temp`` are logged at every step, and ``grad_norm/<group>`` before clipping.

Checkpoints are exact: the state dict holds student, teacher, heads and the loss centers (the
center update queued by the last step is folded in before saving); optimizer, gradient scaler
and ``global_step`` are Lightning's; :meth:`on_save_checkpoint` adds every rank's RNG states
(restored at the first step after a resume, so drop path draws continue identically); the
sampler position is the datamodule's state (:mod:`gpfm_train.datamodule`). The schedules are
functions of ``global_step``.

Experts come from ``napari_gpfm.encoders.load_encoder(encoder, weights=...)`` (or are the
parameter-free colour histogram, :mod:`gpfm_train.models.colour_expert`) and are frozen. A
missing weights file stops the run before training with a one-line :class:`WeightsError`
(``on_missing_expert: error``) or drops that expert with a warning (``skip``).

The configuration dataclasses below are checked strictly: an unknown key or a value of the
wrong type raises a :class:`ConfigError` naming the option (:func:`config_dataclass`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from gpfm_train.models import DistillConfig, ExpertConfig, GPFMDistiller, build_student_backbone
from gpfm_train.models.colour_expert import ColourHistogramExpert, check_histogram_scale
from gpfm_train.optim import apply_schedules, build_optimizer, build_param_groups
from gpfm_train.schedules import ScheduleConfig, Schedules, build_schedules
from napari_gpfm.errors import ConfigError, GPFMError, TrainingError, WeightsError
from napari_gpfm.evaluation.features import is_colour_histogram

_log = logging.getLogger(__name__)

ON_MISSING_EXPERT = ("error", "skip")
#: Checkpoint key of this module's extra state (RNG states, format).
CHECKPOINT_KEY = "gpfm"
CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------- typed config
def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (tuple, list, Sequence):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to the annotation ``tp``; :class:`ConfigError` names ``where``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
                # A mapping meant for a section (``tiling: {...}``): its own error names the
                # bad key, which "expected X or null" would hide.
                if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
                    raise
        wanted = " or ".join(_type_name(o) for o in options if o is not type(None))
        if type(None) in options:
            wanted += " or null"
        raise ConfigError(f"config {where}: expected {wanted}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return config_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config {where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config {where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config {where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config {where}: expected a string, got {value!r}")
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config {where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args:
            if len(value) != len(args):
                raise ConfigError(
                    f"config {where}: expected a list of {len(args)} values, got {list(value)!r}"
                )
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config {where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config {where}: expected {_type_name(tp)}, got {value!r}")


def config_dataclass(cls: type, values: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from a mapping, checking every key and value type.

    ``where`` names the config section in messages (``model.schedule``). Unknown keys, values of
    the wrong type and the dataclass's own validation errors all become one-line
    :class:`ConfigError`s naming the option.
    """
    if values is None:
        values = {}
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"config {where}: expected a mapping of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"config {where}: unknown option(s) {', '.join(map(str, unknown))}; valid options: "
            f"{', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except GPFMError as exc:
        raise ConfigError(f"config {where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {where}: {exc}") from None


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and paths as YAML/JSON-safe builtins (for hparams and checkpoints)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class BackboneConfig:
    """The student ViT (:func:`gpfm_train.models.build_student_backbone`).

    ``kwargs`` go to ``timm.create_model`` (``embed_dim``, ``depth``, ``num_heads``... for a
    smaller model). ``grad_checkpointing`` recomputes block activations in the backward pass
    (activation checkpointing: less memory, ~30% more compute). ``init_weights`` warm-starts
    student and teacher from a timm-layout file or a GPFM/DINOv2 release checkpoint.
    """

    arch: str = "vit_large_patch14_dinov2"
    img_size: int = 224
    drop_path_rate: float = 0.4
    init_values: float = 1e-5
    kwargs: dict = field(default_factory=dict)
    grad_checkpointing: bool = False
    init_weights: str | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """``timm.create_model`` keywords that rebuild this architecture for inference."""
        return {"img_size": self.img_size, "init_values": self.init_values, **self.kwargs}


@dataclass(frozen=True)
class ExpertSource:
    """One frozen expert: a ``napari_gpfm`` encoder, its weights and its loss weights.

    ``encoder`` is a registry name (``uni``, ``phikon``, ``conch``, ``timm:<arch>``; default:
    ``name``) or ``baseline:colour-histogram`` (:mod:`gpfm_train.models.colour_expert`: no
    weights, CLS only); ``weights`` a file (``None``: search ``$GPFM_MODELS_DIR``).
    ``histogram_scale`` (colour histogram only): ``linear`` (the default) or ``log`` targets.
    The rest is the distiller's :class:`~gpfm_train.models.ExpertConfig`.
    """

    name: str
    encoder: str | None = None
    weights: str | None = None
    cls_weight: float = 1.0
    patch_weight: float | None = None
    input_size: int | None = None
    input_mean: tuple[float, float, float] | None = None
    input_std: tuple[float, float, float] | None = None
    clean_input: bool = False
    histogram_scale: str | None = None

    def __post_init__(self) -> None:
        where = f"expert {self.name!r} ({self.encoder_name})"
        if self.histogram_scale is not None and not self.is_colour_histogram:
            raise ConfigError(
                f"{where}: histogram_scale applies to the colour-histogram expert only; drop it"
            )
        if self.is_colour_histogram:
            if self.histogram_scale is not None:
                try:
                    check_histogram_scale(self.histogram_scale)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
            if self.weights is not None:
                raise ConfigError(f"{where}: the colour histogram has no weights; drop weights:")
            if self.patch_weight is not None:
                raise ConfigError(
                    f"{where}: the colour histogram has no patch tokens; drop patch_weight:"
                )
            if self.input_mean is not None or self.input_std is not None:
                raise ConfigError(
                    f"{where}: the colour histogram reads the crops' RGB values; drop "
                    "input_mean/input_std"
                )

    @property
    def encoder_name(self) -> str:
        return self.encoder or self.name

    @property
    def is_colour_histogram(self) -> bool:
        return is_colour_histogram(self.encoder_name)

    def expert_config(self) -> ExpertConfig:
        mean, std = self.input_mean, self.input_std
        if self.is_colour_histogram:  # undo the ImageNet normalisation: RGB in [0, 1]
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return ExpertConfig(
            name=self.name,
            cls_weight=self.cls_weight,
            patch_weight=self.patch_weight,
            input_size=self.input_size,
            input_mean=mean,
            input_std=std,
            clean_input=self.clean_input,
        )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW parameter groups (DINOv2 rules) and gradient clipping."""

    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 3.0

    def __post_init__(self) -> None:
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay={self.layer_decay} must lie in (0, 1]")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"clip_grad={self.clip_grad} must be positive (or null: no clip)")


@dataclass(frozen=True)
class ScheduleOptions(ScheduleConfig):
    """:class:`~gpfm_train.schedules.ScheduleConfig` whose ``global_batch_size`` may be ``None``:
    then it is the real one, ``batch size per device x world size``, read at the first step."""

    global_batch_size: int | None = None  # type: ignore[assignment]

    def resolve(self, global_batch: int) -> ScheduleConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScheduleConfig)}
        if values["global_batch_size"] is None:
            values["global_batch_size"] = int(global_batch)
        return ScheduleConfig(**values)


def _distill_options(values: Any, where: str) -> DistillConfig:
    if isinstance(values, Mapping) and "experts" in values:
        raise ConfigError(
            f"config {where}: list experts under model.experts (with encoder and weights), "
            "not under distill"
        )
    values = dict(values or {})
    values["experts"] = ()
    return config_dataclass(DistillConfig, values, where)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything the module needs: backbone, distillation, experts, schedules, optimizer."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(experts=()))
    experts: tuple[ExpertSource, ...] = ()
    on_missing_expert: str = "error"
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.on_missing_expert not in ON_MISSING_EXPERT:
            raise ConfigError(
                f"on_missing_expert={self.on_missing_expert!r} must be 'error' or 'skip'"
            )
        if self.distill.experts:
            raise ConfigError("list experts under model.experts, not distill.experts")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ConfigError(f"expert names {names} must be unique")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "model") -> PretrainConfig:
        """Build from the ``model`` section of a run config (strict keys and types)."""
        values = dict(values or {})
        if "distill" in values:
            values["distill"] = _distill_options(values["distill"], f"{where}.distill")
        return config_dataclass(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins (what the checkpoint's ``hyper_parameters`` hold)."""
        return _plain(self)


# ---------------------------------------------------------------------------- experts
def expert_weights_problem(source: ExpertSource) -> str | None:
    """Why ``source``'s weights cannot be found (a readable reason), or None when they can.

    Cheap: resolves the registry name and looks for the file, loads nothing.
    """
    from napari_gpfm.encoders import find_weights, get_spec
    from napari_gpfm.encoders.registry import MODELS_DIR_ENV, models_dir, search_dirs

    if source.is_colour_histogram:
        return None  # computed from the crops, no weights
    spec = get_spec(source.encoder_name)
    if source.weights is not None:
        path = Path(source.weights).expanduser()
        return None if path.is_file() else f"weights file {path} does not exist"
    if find_weights(spec) is not None:
        return None
    folders = " or ".join(str(d) for d in search_dirs(spec))
    return (
        f"no {', '.join(spec.weights_filenames)} in {folders} (set ${MODELS_DIR_ENV}, now "
        f"{models_dir()}, or give weights:)"
    )


def load_experts(
    sources: Sequence[ExpertSource], on_missing: str = "error", device: str = "cpu"
) -> tuple[dict[str, nn.Module], tuple[ExpertSource, ...]]:
    """Load the frozen experts; return them by name and the sources actually used.

    A missing weights file raises :class:`WeightsError` (``on_missing="error"``) naming the
    expert and the fix, or drops the expert with a warning (``"skip"``). Every missing file is
    found before any expert is loaded.
    """
    from napari_gpfm.encoders import load_encoder

    kept: list[ExpertSource] = []
    for i, source in enumerate(sources):
        problem = expert_weights_problem(source)
        if problem is None:
            kept.append(source)
            continue
        where = f"model.experts[{i}] ({source.name}, encoder {source.encoder_name})"
        if on_missing == "error":
            raise WeightsError(
                f"{where}: {problem}; provide the file, or set model.on_missing_expert: skip to "
                "train without this expert"
            )
        _log.warning("%s: %s; training without this expert (on_missing_expert: skip)", where,
                     problem)
    experts: dict[str, nn.Module] = {}
    for source in kept:
        if source.is_colour_histogram:
            experts[source.name] = ColourHistogramExpert(scale=source.histogram_scale or "linear")
            continue
        experts[source.name] = load_encoder(source.encoder_name, weights=source.weights,
                                            device=device)
    return experts, tuple(kept)


def _load_init_weights(distiller: GPFMDistiller, path_text: str) -> None:
    from gpfm_train.export_weights import from_gpfm_release_layout
    from napari_gpfm.encoders import read_checkpoint

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.backbone.init_weights: {path} does not exist")
    raw = read_checkpoint(path)
    if isinstance(raw, Mapping) and isinstance(raw.get("teacher"), Mapping):
        release = from_gpfm_release_layout(dict(raw))
        distiller.load_backbone_weights(release.backbone, release.mask_token)
        return
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(
            f"model.backbone.init_weights: {path} is neither a timm state dict nor a GPFM "
            "release checkpoint ({'teacher': ...})"
        )
    distiller.load_backbone_weights(dict(raw))


# ---------------------------------------------------------------------------- rng states
def _rng_state() -> dict[str, Any]:
    """This process's RNG states as checkpoint-safe values (tensors, ints, lists)."""
    py_version, py_keys, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_keys), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np.asarray(np_keys, np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (collective when distributed)."""
    import torch.distributed as dist

    mine = _rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


# ---------------------------------------------------------------------------- FSDP helpers
def _is_fsdp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def _fsdp_wrap_components(distiller: GPFMDistiller, strategy: Any) -> None:
    """Wrap student and teacher component by component, identically (DINOv2's layout).

    Each backbone block and each head is its own FSDP unit, built the same way for the student
    and its teacher copy, so their flat parameters are laid out and sharded identically and the
    EMA can run shard by shard (:func:`_fsdp_ema`). What is left (patch embedding, tokens,
    position embedding, final norm) lands in the root unit Lightning creates.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    kwargs = {
        "sharding_strategy": strategy.sharding_strategy,
        "mixed_precision": strategy.mixed_precision_config,
        "cpu_offload": strategy.cpu_offload,
        "device_id": strategy.root_device.index,
        "use_orig_params": True,
    }
    for tree in (distiller.student, distiller.teacher):
        backbone = tree["backbone"]
        for i in range(len(backbone.blocks)):
            backbone.blocks[i] = FSDP(backbone.blocks[i], **kwargs)
        for key in list(tree.keys()):
            if key != "backbone":
                tree[key] = FSDP(tree[key], **kwargs)


@torch.no_grad()
def _fsdp_ema(distiller: GPFMDistiller, root: nn.Module, momentum: float) -> None:
    """Teacher EMA under FSDP: flat shards of the nested units, full params of the root unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    teacher_flat: list[torch.Tensor] = []
    student_flat: list[torch.Tensor] = []
    for key in distiller._ema_keys:
        student_units = list(FSDP.fsdp_modules(distiller.student[key]))
        teacher_units = list(FSDP.fsdp_modules(distiller.teacher[key]))
        for s_unit, t_unit in zip(student_units, teacher_units, strict=True):
            s_flat, t_flat = s_unit._flat_param, t_unit._flat_param
            if s_flat is not None and t_flat is not None:
                student_flat.append(s_flat.data)
                teacher_flat.append(t_flat.data)
    if teacher_flat:
        torch._foreach_mul_(teacher_flat, momentum)
        torch._foreach_add_(teacher_flat, student_flat, alpha=1.0 - momentum)
    # Parameters owned by the root unit (mixed student/teacher layout): update in full.
    nested = {id(p) for key in distiller._ema_keys
              for tree in (distiller.student, distiller.teacher)
              for unit in FSDP.fsdp_modules(tree[key]) for p in unit.parameters()}
    with FSDP.summon_full_params(root, recurse=False, writeback=True):
        for key in distiller._ema_keys:
            pairs = zip(distiller.teacher[key].named_parameters(),
                        distiller.student[key].named_parameters(), strict=True)
            for (_, t_param), (_, s_param) in pairs:
                if id(t_param) in nested:
                    continue
                t_param.mul_(momentum).add_(s_param.detach(), alpha=1.0 - momentum)


# ---------------------------------------------------------------------------- module
class GPFMPretrainModule(pl.LightningModule):
    """GPFM pretraining as a LightningModule (manual optimisation; see the module docstring).

    Args:
        config: a :class:`PretrainConfig`, or the ``model`` mapping of a run config.
        experts: frozen expert modules by name (each returns ``{"cls", "patch_tokens"}``);
            ``None`` loads ``config.experts`` with ``napari_gpfm.encoders.load_encoder``.
            Given experts must match ``config.experts`` by name.
    """

    def __init__(
        self,
        config: PretrainConfig | Mapping[str, Any] | None = None,
        experts: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        cfg = config if isinstance(config, PretrainConfig) else PretrainConfig.from_mapping(config)
        if experts is None:
            experts, sources = load_experts(cfg.experts, cfg.on_missing_expert)
        else:
            sources = cfg.experts
            if sorted(experts) != sorted(s.name for s in sources):
                raise ConfigError(
                    f"experts given {sorted(experts)} do not match model.experts "
                    f"{sorted(s.name for s in sources)}"
                )
        self.config = dataclasses.replace(cfg, experts=tuple(sources))
        self.save_hyperparameters(self.config.to_dict())

        bcfg = self.config.backbone
        backbone = build_student_backbone(
            bcfg.arch, bcfg.img_size, bcfg.drop_path_rate, init_values=bcfg.init_values,
            **bcfg.kwargs,
        )
        if bcfg.grad_checkpointing:
            backbone.set_grad_checkpointing(True)
        distill = dataclasses.replace(
            self.config.distill, experts=tuple(s.expert_config() for s in sources)
        )
        self.distiller = GPFMDistiller(backbone, experts, distill)
        if bcfg.init_weights:
            _load_init_weights(self.distiller, bcfg.init_weights)

        self._schedules: Schedules | None = None
        self._schedule_config: ScheduleConfig | None = None
        self._pending_rng: list[dict[str, Any]] | None = None
        self._fsdp_wrapped = False

    # ------------------------------------------------------------------ schedules
    @property
    def schedule_config(self) -> ScheduleConfig | None:
        """The resolved schedule configuration (``None`` before the first step)."""
        return self._schedule_config

    def schedules_for(self, per_device_batch: int) -> Schedules:
        """The schedules of this run, with the global batch ``per_device_batch x world size``."""
        world = self.trainer.world_size if self._trainer is not None else 1
        resolved = self.config.schedule.resolve(per_device_batch * world)
        if self._schedules is None or resolved != self._schedule_config:
            self._schedule_config = resolved
            self._schedules = build_schedules(resolved)
        return self._schedules

    def total_steps(self) -> int:
        """Iterations of the configured schedule (``epochs x epoch_length``)."""
        return self.config.schedule.epochs * self.config.schedule.epoch_length

    # ------------------------------------------------------------------ Lightning hooks
    def configure_model(self) -> None:
        if self._fsdp_wrapped or self._trainer is None or not _is_fsdp(self.trainer.strategy):
            return
        if self.config.schedule.freeze_backbone_epochs:
            # FSDP keeps gradients in flat shards: the backbone's cannot be dropped alone.
            raise ConfigError(
                "model.schedule.freeze_backbone_epochs needs the ddp strategy (or one device), "
                "not fsdp; set it to 0 or use trainer.strategy=ddp"
            )
        if self.config.backbone.grad_checkpointing:
            # The strategy checkpoints the blocks (activation_checkpointing_policy); timm's
            # own checkpoint_seq around FSDP units would recompute through them a second way.
            self.distiller.student["backbone"].set_grad_checkpointing(False)
        _fsdp_wrap_components(self.distiller, self.trainer.strategy)
        self._fsdp_wrapped = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        ocfg = self.config.optim
        groups = build_param_groups(
            self.distiller.student.named_parameters(),
            depth=len(self.distiller.student["backbone"].blocks),
            layer_decay=ocfg.layer_decay,
            patch_embed_lr_mult=ocfg.patch_embed_lr_mult,
        )
        return build_optimizer(groups, betas=ocfg.betas)

    def forward(self, batch: Mapping[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
        """All loss terms of one step (the distiller's forward)."""
        return self.distiller(batch, teacher_temp=teacher_temp)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if self._pending_rng is not None:
            self._restore_rng()
        n_images = int(batch["global_crops"].shape[0])
        per_device = n_images // self.distiller.cfg.n_global
        values = self.schedules_for(per_device).at(self.global_step)
        optimizer = self.optimizers()
        apply_schedules(optimizer.optimizer, values["lr"], values["wd"], values["last_layer_lr"])

        losses = self(batch, values["teacher_temp"])
        self._stop_if_diverged(losses)
        self.manual_backward(losses["total"])
        cfg = self.config.schedule
        if self.global_step < cfg.freeze_backbone_epochs * cfg.epoch_length:
            # No gradient, no AdamW update (nor weight decay) for the backbone; every rank
            # drops the same (already reduced) gradients, so DDP stays in step.
            for param in self.distiller.student["backbone"].parameters():
                param.grad = None
        optimizer.step()  # -> precision plugin: unscale, on_before_optimizer_step (clip), step
        optimizer.zero_grad(set_to_none=True)
        self._update_teacher(values["momentum"])

        logged = {f"loss/{k}": v.detach().float() for k, v in losses.items()}
        logged.update({k: torch.tensor(float(v)) for k, v in values.items()})
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=per_device)
        self.log("loss", losses["total"].detach().float(), on_step=True, on_epoch=False,
                 prog_bar=True, logger=False, batch_size=per_device)
        return losses["total"].detach()

    def _stop_if_diverged(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`TrainingError` before a NaN / infinite loss reaches the weights.

        Stepping on would turn the student, then the EMA teacher, into NaN, and every later
        checkpoint with them. Every rank takes the same decision (one rank's NaN stops all),
        so none is left waiting in the gradient all-reduce. Nothing of this step is saved.
        """
        diverged = not bool(torch.isfinite(losses["total"].detach()))
        if self._trainer is not None:
            diverged = self.trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if not diverged:
            return
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items()
                          if k != "total")
        raise self._diverged(f"the loss is not finite ({terms})")

    def _scales_fp16_gradients(self) -> bool:
        """Whether a GradScaler runs, which skips steps whose gradients overflowed by itself."""
        return self._trainer is not None and self.trainer.precision == "16-mixed"

    def _diverged(self, what: str) -> TrainingError:
        return TrainingError(
            f"training diverged at step {self.global_step}: {what}; lower "
            f"model.schedule.base_lr (now {self.config.schedule.base_lr:g})"
            + (" or train in bf16-mixed precision" if self._scales_fp16_gradients() else "")
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        max_norm = self.config.optim.clip_grad
        norms = self.clip_student_gradients(max_norm)
        # A finite loss can still back-propagate to NaN / inf (an overflow in backward). Under
        # fp16 the scaler then skips the step and lowers its scale; otherwise the step would
        # write NaN into the weights, so stop here. The gradients are already reduced over
        # ranks, so every rank sees the same norms and stops at the same step.
        if not self._scales_fp16_gradients():
            broken = [name for name, norm in norms.items() if not bool(torch.isfinite(norm))]
            if broken:
                raise self._diverged(f"the gradients of {' and '.join(broken)} are not finite")
        self.log_dict({f"grad_norm/{k}": v for k, v in norms.items()}, on_step=True,
                      on_epoch=False, batch_size=1)

    @torch.no_grad()
    def clip_student_gradients(self, max_norm: float | None) -> dict[str, torch.Tensor]:
        """Clip each of :meth:`GPFMDistiller.gradient_clip_groups` to ``max_norm`` separately.

        Returns the norms before clipping. Under FSDP the gradients are shards: the squared
        norms are summed over ranks first, so the clip matches the unsharded one.
        """
        import torch.distributed as dist

        sharded = self._trainer is not None and _is_fsdp(self.trainer.strategy)
        norms = {}
        for name, params in self.distiller.gradient_clip_groups().items():
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            squares = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
            if sharded and dist.is_initialized():
                dist.all_reduce(squares)
            norm = squares.sqrt()
            norms[name] = norm
            if max_norm is not None:
                coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norms

    def _update_teacher(self, momentum: float) -> None:
        if self._fsdp_wrapped:
            _fsdp_ema(self.distiller, self.trainer.strategy.model, momentum)
        else:
            self.distiller.update_teacher(momentum)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.distiller.dino_loss.apply_center_update()
        self.distiller.ibot_loss.apply_center_update()
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "rng": _all_rng_states(),
            "schedule": None if self._schedule_config is None else _plain(self._schedule_config),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(extra, Mapping) or extra.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                "the checkpoint was not written by gpfm_train's GPFMPretrainModule (no 'gpfm' "
                "entry); resume from a checkpoint of gpfm-train fit"
            )
        self._pending_rng = list(extra.get("rng") or []) or None

    def _restore_rng(self) -> None:
        states, self._pending_rng = self._pending_rng, None
        rank = self.global_rank
        if states and rank < len(states):
            _set_rng_state(states[rank])
        else:
            _log.warning("the checkpoint has no RNG state for rank %d (world size changed); "
                         "random draws will differ from an uninterrupted run", rank)


__all__ = [
    "BackboneConfig",
    "ExpertSource",
    "GPFMPretrainModule",
    "OptimConfig",
    "PretrainConfig",
    "ScheduleOptions",
    "config_dataclass",
    "expert_weights_problem",
    "load_experts",
]
