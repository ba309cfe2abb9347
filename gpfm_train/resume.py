"""What ``gpfm-train fit --ckpt-path`` checks before a run resumes.

Lightning reads the checkpoint deep inside ``Trainer.fit``: a file that is not a training
checkpoint ends in a long traceback, a checkpoint of another network in a size-mismatch error
of hundreds of lines, and changed schedule options are silently rebuilt from the new values
(the learning rate and teacher momentum jump at the resumed step). Here the checkpoint is
opened (memory-mapped: its tensors are not read) before training, a wrong file or another
network is refused in one line naming the file and the options that differ, and changed
schedule or optimiser options are named in a warning.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_gpfm.errors import ConfigError

STEP_CHECKPOINT = re.compile(r"gpfm-step=(\d+)\.ckpt$")
# Sections of the module's saved hyper-parameters that shape its tensors, and those whose
# change only changes the training from the resumed step on.
NETWORK_SECTIONS = ("backbone", "distill", "experts")
TRAINING_SECTIONS = ("schedule", "optim")


def resolve_checkpoint(ckpt_path: str | None, ckpt_dir: Path) -> Path | None:
    """The file ``--ckpt-path`` names: ``"last"`` is the run's newest ``last*.ckpt`` or, when a
    hard kill left none, its newest step checkpoint."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        path = Path(ckpt_path).expanduser()
        if not path.exists():
            raise ConfigError(f"--ckpt-path {ckpt_path}: no such checkpoint file")
        if path.is_dir():
            raise ConfigError(
                f"--ckpt-path {ckpt_path} is a folder; pass a .ckpt file from a run's "
                f"checkpoints folder (e.g. {path / 'checkpoints' / 'last.ckpt'}), or "
                "--ckpt-path last with that run's trainer.default_root_dir"
            )
        return path
    lasts = sorted(ckpt_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if lasts:
        return lasts[-1]
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("gpfm-step=*.ckpt")
                   if (m := STEP_CHECKPOINT.search(p.name)))
    if steps:
        return steps[-1][1]
    raise ConfigError(
        f"--ckpt-path last: {ckpt_dir} holds no checkpoint yet; start without --ckpt-path "
        "(or set trainer.default_root_dir to the run's folder)"
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, memory-mapped; a ConfigError for anything that is not a
    checkpoint written by ``gpfm-train fit``."""
    import torch

    from gpfm_train.module import CHECKPOINT_KEY

    def refusal(why: str) -> ConfigError:
        return ConfigError(f"--ckpt-path {path}: not a readable training checkpoint ({why}); "
                           "pass a .ckpt from the run's checkpoints folder")

    if not zipfile.is_zipfile(path):
        raise refusal("truncated, or not written by gpfm-train fit")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many kinds for archives it did not write
        raise refusal("truncated, or not written by gpfm-train fit") from None
    needed = ("pytorch-lightning_version", "state_dict", "hyper_parameters", CHECKPOINT_KEY)
    if not isinstance(ckpt, Mapping) or any(k not in ckpt for k in needed):
        raise refusal("exported weights or another program's file")
    return dict(ckpt)


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, tuple):  # a tuple in the module's config is a list once saved
        value = list(value)
    return {prefix: value}


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any],
                 sections: tuple[str, ...]) -> list[str]:
    old, new = {}, {}
    for section in sections:
        old.update(_flat(saved.get(section), f"model.{section}"))
        new.update(_flat(now.get(section), f"model.{section}"))
    return [f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def check_resumable(ckpt: Mapping[str, Any], path: Path, module: Any) -> list[str]:
    """Refuse a checkpoint whose tensors do not fit ``module`` (naming the network options
    that differ); return warnings for schedule or optimiser options that changed."""
    saved = ckpt.get("hyper_parameters") or {}
    now = dict(module.hparams)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    changed = [d for d in _differences(saved, now, NETWORK_SECTIONS) if ".init_weights " not in d]
    reshaped = [k for k in sorted(expected.keys() & stored.keys()) if expected[k] != stored[k]]
    # Other key names alone may be a strategy's way of saving (left to Lightning); with
    # changed network options they are another network.
    if reshaped or (expected.keys() != stored.keys() and changed):
        first = (reshaped or sorted(expected.keys() ^ stored.keys()))[0]
        what = ("; options that differ: " + ", ".join(changed) if changed else
                f" (first difference: {first} {stored.get(first)} in the checkpoint, "
                f"{expected.get(first)} here)")
        raise ConfigError(
            f"--ckpt-path {path} holds another network than this configuration{what}; resume "
            "with the run's own configuration, or start a new run from exported weights "
            "(model.backbone.init_weights)"
        )
    changed = _differences(saved, now, TRAINING_SECTIONS)
    if not changed:
        return []
    step = ckpt.get("global_step", "?")
    return [
        f"resuming at step {step} with changed options: {', '.join(changed)}. The schedules "
        "(lr, weight decay, teacher momentum and temperature) are functions of the step and are "
        "recomputed from the new values, so they jump at this step"
    ]


def check_run_folder(path: Path | None, ckpt_dir: Path) -> None:
    """Refuse to mix two runs in ``ckpt_dir``: a fresh run there would write last-v1.ckpt beside
    the earlier run's last.ckpt (and ``--ckpt-path last`` would then resume the old run); a
    checkpoint of another folder resumed there would overwrite that run's last.ckpt and mix the
    two runs' step checkpoints."""
    if not any(ckpt_dir.glob("*.ckpt")):
        return
    if path is None:
        raise ConfigError(
            f"{ckpt_dir} holds the checkpoints of an earlier run: resume it with --ckpt-path "
            "last, or start afresh in another trainer.default_root_dir"
        )
    if path.resolve().parent != ckpt_dir.resolve():
        raise ConfigError(
            f"{ckpt_dir} holds the checkpoints of another run; to branch from {path}, set "
            "trainer.default_root_dir to an empty folder (or resume that run with --ckpt-path "
            "last)"
        )
