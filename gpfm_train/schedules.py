"""Per-iteration schedules of GPFM pretraining (DINOv2 ``CosineScheduler`` / ``build_schedulers``).

Recipe (iterations, epoch = 1250 iterations, 400 epochs = 500k iterations):

* lr: linear warm-up 0 -> ``base_lr * sqrt(global_batch / 1024)`` over 40 epochs, then cosine
  to 1e-6.
* weight decay: cosine 0.04 -> 0.4 over the whole run.
* teacher momentum: cosine 0.992 -> 1.0 over the whole run.
* teacher temperature: linear 0.04 -> 0.07 over 30 epochs, then 0.07.
* last-layer lr: the lr schedule, but 0 during the first epoch.

Only numpy is needed here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_gpfm.errors import ConfigError


def scaled_lr(base_lr: float = 4e-4, global_batch: int = 1024) -> float:
    """DINOv2's ``sqrt_wrt_1024`` rule: ``base_lr * sqrt(global_batch / 1024)``."""
    if global_batch < 1:
        raise ConfigError(f"global_batch={global_batch} must be at least 1")
    return base_lr * math.sqrt(global_batch / 1024.0)


class CosineSchedule:
    """``freeze_iters`` zeros, then a linear warm-up ``start_warmup -> base`` over
    ``warmup_iters`` (both ends included), then a half cosine ``base -> final`` over the rest.

    ``schedule[it]`` is the value at iteration ``it``; iterations at or past ``total_iters`` give
    ``final``. ``schedule.values`` is the whole ``(total_iters,)`` float64 array.
    """

    def __init__(
        self,
        base: float,
        final: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ConfigError(
                f"schedule lengths must be >= 0 (total={total_iters}, warmup={warmup_iters}, "
                f"freeze={freeze_iters})"
            )
        cosine_iters = total_iters - warmup_iters - freeze_iters
        if cosine_iters < 0:
            raise ConfigError(
                f"warm-up ({warmup_iters}) plus freeze ({freeze_iters}) iterations exceed the "
                f"{total_iters} total iterations; shorten the warm-up or lengthen the run"
            )
        self.base = float(base)
        self.final = float(final)
        self.total_iters = int(total_iters)
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup, base, warmup_iters)
        steps = np.arange(cosine_iters)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(cosine_iters, 1)))
        self.values: np.ndarray = np.concatenate((freeze, warmup, cosine))

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, iteration: int) -> float:
        if iteration < 0:
            raise IndexError(f"iteration {iteration} is negative")
        if iteration >= self.total_iters:
            return self.final
        return float(self.values[iteration])


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule hyperparameters; defaults are the GPFM recipe (note section 4)."""

    epoch_length: int = 1250
    epochs: int = 400
    base_lr: float = 4e-4
    global_batch_size: int = 1536
    min_lr: float = 1e-6
    warmup_epochs: int = 40
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    freeze_last_layer_epochs: int = 1
    # Not in the recipe: train the heads alone (student backbone frozen) for this many epochs,
    # for a run that starts from exported weights, which hold a backbone but no heads: the
    # fresh heads' first, random targets would otherwise pull the pretrained features apart.
    freeze_backbone_epochs: int = 0

    def __post_init__(self) -> None:
        # A negative count would slice the schedules from their end (freeze_last_layer_epochs
        # -1 froze the last layer for all but the final epoch) instead of failing.
        for name in ("epoch_length", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs",
                     "freeze_backbone_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")

    @property
    def total_iters(self) -> int:
        return self.epochs * self.epoch_length

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.base_lr, self.global_batch_size)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ScheduleConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown schedule option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**values)


@dataclass(frozen=True)
class Schedules:
    """The five per-iteration schedules of one run."""

    lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_lr: CosineSchedule

    def at(self, iteration: int) -> dict[str, float]:
        """All values at ``iteration``."""
        return {
            "lr": self.lr[iteration],
            "wd": self.wd[iteration],
            "momentum": self.momentum[iteration],
            "teacher_temp": self.teacher_temp[iteration],
            "last_layer_lr": self.last_layer_lr[iteration],
        }


def build_schedules(cfg: ScheduleConfig | Mapping[str, Any] | None = None) -> Schedules:
    """Schedules of the GPFM recipe, or of ``cfg`` (a :class:`ScheduleConfig` or a mapping)."""
    if cfg is None:
        cfg = ScheduleConfig()
    elif not isinstance(cfg, ScheduleConfig):
        cfg = ScheduleConfig.from_mapping(cfg)
    total = cfg.total_iters
    if total < 1:
        raise ConfigError(
            f"epochs={cfg.epochs} x epoch_length={cfg.epoch_length} gives no iterations"
        )
    warmup = cfg.warmup_epochs * cfg.epoch_length
    lr = CosineSchedule(cfg.peak_lr, cfg.min_lr, total, warmup_iters=warmup, start_warmup=0.0)
    wd = CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, total)
    momentum = CosineSchedule(cfg.momentum_teacher, cfg.final_momentum_teacher, total)
    temp_iters = cfg.warmup_teacher_temp_epochs * cfg.epoch_length
    teacher_temp = CosineSchedule(
        cfg.teacher_temp,
        cfg.teacher_temp,
        temp_iters,
        warmup_iters=temp_iters,
        start_warmup=cfg.warmup_teacher_temp,
    )
    last_layer_lr = CosineSchedule(
        cfg.peak_lr, cfg.min_lr, total, warmup_iters=warmup, start_warmup=0.0
    )
    last_layer_lr.values[: cfg.freeze_last_layer_epochs * cfg.epoch_length] = 0.0
    return Schedules(lr, wd, momentum, teacher_temp, last_layer_lr)
