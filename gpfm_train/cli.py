"""``gpfm-train``: pretrain (``fit``), export the teacher (``export``), build corpus manifests
(``manifest``) and embed a cohort across devices/nodes (``embed``).

Run configuration
-----------------
``gpfm-train fit --config FILE`` reads a YAML file with four sections -- ``seed_everything``,
``model`` (:class:`gpfm_train.module.PretrainConfig`), ``data``
(:class:`gpfm_train.datamodule.DataOptions`) and ``trainer`` (:class:`TrainerOptions`) -- and
checks every key and type (one readable line, exit code 2, for anything wrong). ``FILE`` may
be a bare packaged name (``tiny_cpu.yaml``, ``gpfm_vitl14``). ``${VAR}`` and
``${VAR:-default}`` expand environment variables (``${GPFM_MODELS_DIR}`` defaults to
napari-gpfm's models folder). Overrides, applied before checking, in jsonargparse style::

    gpfm-train fit --config tiny_cpu.yaml --trainer.max_steps 20 --data.batch_size=4
    gpfm-train fit --config tiny_cpu.yaml --set model.schedule.epochs=2 --set trainer.devices=2

Why not ``LightningCLI``: the run needs checks LightningCLI cannot express where they must
happen (missing expert weights, data paths and manifests, cross-section consistency such as
crop counts vs. the distiller, all *before* Lightning launches its processes), errors must be
one line with exit code 2 like the rest of napari-gpfm, the model configuration is a tree of
frozen dataclasses shared with the library (schedules, distiller, augmentation), and
``gpfm-train`` has non-Lightning commands (``export``, ``manifest``) beside ``fit``. A small
YAML + argparse layer keeps jsonargparse's override syntax without those conflicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_gpfm.cli._common import slide_pixel_size
from napari_gpfm.errors import (
    ConfigError,
    GPFMError,
    ParameterError,
    TrainingError,
    WeightsError,
    describe_os_error,
    first_line,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "fsdp")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
LOGGERS = ("csv", "tensorboard")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

LAUNCH_HELP = """\
launching:
  one machine, N devices   gpfm-train fit --config C --trainer.devices N
                           (Lightning starts N processes; strategy ddp or fsdp)
  SLURM, 2 nodes x 8 GPUs  #SBATCH --nodes=2 --ntasks-per-node=8 --gpus-per-node=8
                           srun gpfm-train fit --config gpfm_vitl14.yaml
                           (trainer.num_nodes 2, trainer.devices 8; Lightning reads SLURM_*)
  torchrun                 torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
                             --rdzv-endpoint HOST:29500 -m gpfm_train.cli fit --config C
  resume                   gpfm-train fit --config C --ckpt-path last   (or a .ckpt path)
"""


# ---------------------------------------------------------------------------- trainer options
@dataclass(frozen=True)
class TrainerOptions:
    """The ``trainer`` section: how Lightning runs the job.

    ``max_steps`` ``null`` = the schedule's ``epochs x epoch_length``. ``strategy``: ``auto``,
    ``single_device``, ``ddp``, ``ddp_spawn`` or ``fsdp`` (``fsdp_sharding_strategy``, default
    GPFM's ``SHARD_GRAD_OP``). Checkpoints go to ``<default_root_dir>/checkpoints`` every
    ``checkpoint_every_n_steps`` (the newest ``keep_checkpoints`` kept, -1 = all, plus
    ``last.ckpt``). ``extra`` passes further ``lightning.Trainer`` arguments.
    """

    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int | None = None
    log_every_n_steps: int = 10
    default_root_dir: str = "runs/gpfm"
    checkpoint_every_n_steps: int = 1250
    keep_checkpoints: int = 3
    logger: str | None = "csv"
    enable_progress_bar: bool = True
    ddp_find_unused_parameters: bool = False
    fsdp_sharding_strategy: str = "SHARD_GRAD_OP"
    fsdp_cpu_offload: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.fsdp_sharding_strategy not in FSDP_SHARDING:
            raise ConfigError(
                f"fsdp_sharding_strategy={self.fsdp_sharding_strategy!r}: use one of "
                f"{', '.join(FSDP_SHARDING)}"
            )
        if self.logger is not None and self.logger not in LOGGERS:
            raise ConfigError(f"logger={self.logger!r}: use csv, tensorboard or null")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be at least 1 (or null)")
        if self.checkpoint_every_n_steps < 1 or self.log_every_n_steps < 1:
            raise ConfigError("checkpoint_every_n_steps and log_every_n_steps must be >= 1")
        if self.keep_checkpoints == 0 or self.keep_checkpoints < -1:
            raise ConfigError(f"keep_checkpoints={self.keep_checkpoints}: use -1 (all) or >= 1")
        if self.num_nodes < 1:
            raise ConfigError(f"num_nodes={self.num_nodes} must be at least 1")
        import lightning.pytorch as pl

        accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
        managed = {f.name for f in dataclasses.fields(self)} | {
            "callbacks", "max_epochs", "use_distributed_sampler", "num_sanity_val_steps",
        }
        unknown = sorted(set(self.extra) - accepted)
        clash = sorted(set(self.extra) & managed)
        if unknown:
            raise ConfigError(f"extra: {', '.join(unknown)} are not lightning.Trainer arguments")
        if clash:
            raise ConfigError(
                f"extra: {', '.join(clash)} are set by gpfm-train; use the trainer options"
            )


@dataclass(frozen=True)
class RunConfig:
    """A whole ``gpfm-train fit`` configuration, checked."""

    seed_everything: int = 0
    model: Any = None
    data: Any = None
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    source: str = ""

    def __post_init__(self) -> None:
        crops, distill = self.data.crops, self.model.distill
        if crops.local_crops_number != distill.n_local:
            raise ConfigError(
                f"data.crops.local_crops_number ({crops.local_crops_number}) must equal "
                f"model.distill.n_local ({distill.n_local})"
            )
        if crops.global_crops_size != self.model.backbone.img_size:
            raise ConfigError(
                f"data.crops.global_crops_size ({crops.global_crops_size}) must equal "
                f"model.backbone.img_size ({self.model.backbone.img_size})"
            )
        clean = [e.name for e in self.model.experts if e.clean_input]
        if clean and not crops.clean_global_crops:
            raise ConfigError(
                f"model.experts {clean} read the clean global crops (clean_input: true); set "
                "data.crops.clean_global_crops: true"
            )

    @property
    def max_steps(self) -> int:
        if self.trainer.max_steps is not None:
            return self.trainer.max_steps
        return self.model.schedule.epochs * self.model.schedule.epoch_length

    def to_dict(self) -> dict[str, Any]:
        from gpfm_train.module import _plain

        return {
            "seed_everything": self.seed_everything,
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "trainer": _plain(self.trainer),
        }


# ---------------------------------------------------------------------------- config files
def packaged_configs() -> list[str]:
    """Names of the configs shipped with gpfm_train."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(text: str | os.PathLike) -> Path:
    """A config file: the path itself, else a packaged config of that (bare) name."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    name = str(text)
    if os.sep not in name and "/" not in name:
        for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"config not found: {text}; give a YAML path or a packaged config "
        f"({', '.join(packaged_configs())})"
    )


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        if name == "GPFM_MODELS_DIR":
            from napari_gpfm.encoders import models_dir

            return str(models_dir())
        raise ConfigError(
            f"config {where}: environment variable {name} is not set; export it or write "
            f"${{{name}:-default}}"
        )

    return _ENV.sub(replace, value)


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for ``key = "a.b.c"`` (list items by index)."""
    parts = [p for p in key.split(".") if p]
    if not parts:
        raise ConfigError(f"override {key!r} names no option")
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {where} is not an item of the list")
            node = node[int(part)]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {key}: {where} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key}: {last} is not an item of the list")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``KEY=VALUE`` strings, and ``--KEY VALUE`` / ``--KEY=VALUE`` argument pairs, as
    ``(key, parsed value)`` (values are YAML)."""
    out: list[tuple[str, Any]] = []
    items = list(items)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            body = item[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                key, text = body, items[i + 1]
                i += 1
            else:
                raise ConfigError(f"override {item} has no value; write {item} VALUE")
            if "." not in key:
                raise ConfigError(
                    f"unknown option {item}; config overrides look like --trainer.max_steps 10"
                )
        else:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            key, text = item.split("=", 1)
        out.append((key.strip(), _parse_value(text)))
        i += 1
    return out


def read_config(path: str | os.PathLike, overrides: Sequence[tuple[str, Any]] = ()) -> dict:
    """The raw configuration mapping: YAML, environment expanded, overrides applied."""
    import yaml

    file = resolve_config_path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{file}:{where}: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a mapping with model, data and trainer sections")
    for key, value in overrides:
        apply_override(raw, key, value)
    return _expand_env(raw, "")


def run_config_from_mapping(raw: Mapping[str, Any], source: str = "") -> RunConfig:
    """Check a raw configuration mapping and build the :class:`RunConfig`."""
    from gpfm_train.datamodule import DataOptions
    from gpfm_train.module import PretrainConfig, config_dataclass

    sections = {"seed_everything", "model", "data", "trainer"}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(
            f"config: unknown section(s) {', '.join(map(str, unknown))}; valid: "
            f"{', '.join(sorted(sections))}"
        )
    seed = raw.get("seed_everything", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"config seed_everything: expected a non-negative integer, got {seed!r}")
    if raw.get("data") is None:
        raise ConfigError("config: the data section is missing (data.sources lists the tiles)")
    return RunConfig(
        seed_everything=seed,
        model=PretrainConfig.from_mapping(raw.get("model")),
        data=DataOptions.from_mapping(raw.get("data")),
        trainer=config_dataclass(TrainerOptions, raw.get("trainer"), "trainer"),
        source=source,
    )


def load_run_config(
    path: str | os.PathLike, overrides: Sequence[tuple[str, Any]] | Sequence[str] = ()
) -> RunConfig:
    """Read, expand, override and check a run configuration file."""
    pairs = [o for o in overrides if isinstance(o, tuple)]
    texts = [o for o in overrides if isinstance(o, str)]
    pairs += parse_overrides(texts)
    raw = read_config(path, pairs)
    return run_config_from_mapping(raw, str(resolve_config_path(path)))


# ---------------------------------------------------------------------------- fit
def _relocate_checkpoint_state(state: dict[str, Any], dirpath: Path) -> dict[str, Any]:
    """The checkpoint callback's saved bookkeeping, moved to ``dirpath``.

    A run resumed in another folder than it was saved in (the run folder moved or copied, or
    a run branched from another's checkpoint) would otherwise lose it: Lightning then writes
    ``last-v1.ckpt`` beside the stale ``last.ckpt`` (which the documented
    ``gpfm-train export .../last.ckpt`` would read) and stops pruning the older step
    checkpoints. Each saved path is taken by its file name in ``dirpath``, where that file
    exists; the others are forgotten (the folder they were in is not touched).
    """

    def here(path: Any) -> str:
        if not path:
            return ""
        moved = dirpath / Path(str(path)).name
        return str(moved) if moved.is_file() else ""

    relocated = dict(state, dirpath=str(dirpath))
    relocated["best_k_models"] = {
        here(p): score for p, score in (state.get("best_k_models") or {}).items() if here(p)
    }
    for key in ("last_model_path", "best_model_path", "kth_best_model_path"):
        relocated[key] = here(state.get(key))
    if not relocated["best_model_path"]:
        relocated["best_model_score"] = None
    return relocated


def _checkpoint_callback(**kwargs: Any) -> Any:
    """A ``ModelCheckpoint`` that also saves the final step of a run.

    Lightning saves every ``every_n_train_steps`` only; a run whose length is not a multiple
    would otherwise end with ``last.ckpt`` up to ``n - 1`` steps old.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    class FinalStepCheckpoint(ModelCheckpoint):
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            moved_from = state_dict.get("dirpath")
            if moved_from and self.dirpath and Path(moved_from) != Path(self.dirpath):
                state_dict = _relocate_checkpoint_state(state_dict, Path(self.dirpath))
            super().load_state_dict(state_dict)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
                candidates = self._monitor_candidates(trainer)
                self._save_topk_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
            super().on_train_end(trainer, pl_module)

    return FinalStepCheckpoint(**kwargs)


def _say(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(message, flush=True)


def build_trainer(run: RunConfig, callbacks: Sequence[Any] = ()) -> Any:
    """The ``lightning.Trainer`` of ``run`` (strategy, precision, checkpoints, logger)."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    opts = run.trainer
    root = Path(opts.default_root_dir).expanduser()
    if opts.strategy == "ddp":
        strategy: Any = DDPStrategy(find_unused_parameters=opts.ddp_find_unused_parameters)
    elif opts.strategy == "ddp_spawn":
        strategy = DDPStrategy(
            start_method="spawn", find_unused_parameters=opts.ddp_find_unused_parameters
        )
    elif opts.strategy == "fsdp":
        from timm.models.vision_transformer import Block

        # Under FSDP, Lightning wraps the ViT blocks for activation checkpointing after
        # sharding them (the module then leaves timm's own checkpointing off).
        checkpointing = {Block} if run.model.backbone.grad_checkpointing else None
        strategy = FSDPStrategy(
            sharding_strategy=opts.fsdp_sharding_strategy,
            cpu_offload=opts.fsdp_cpu_offload,
            state_dict_type="full",
            activation_checkpointing_policy=checkpointing,
            use_orig_params=True,
        )
    else:
        strategy = opts.strategy
    from gpfm_train.interrupt import StopOnInterrupt
    from gpfm_train.progress import StepProgressBar

    keep = opts.keep_checkpoints
    checkpoint = _checkpoint_callback(
        dirpath=root / "checkpoints",
        filename="gpfm-{step:08d}",
        every_n_train_steps=opts.checkpoint_every_n_steps,
        save_top_k=keep,
        monitor="step" if keep != -1 else None,
        mode="max",
        save_last=True,
    )
    bar = [StepProgressBar()] if opts.enable_progress_bar else []
    logger: Any = False
    if opts.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(root, name="logs")
    elif opts.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(root, name="logs")
    try:
        return pl.Trainer(
            accelerator=opts.accelerator,
            devices=opts.devices,
            num_nodes=opts.num_nodes,
            strategy=strategy,
            precision=opts.precision,
            max_steps=run.max_steps,
            max_epochs=-1,
            log_every_n_steps=opts.log_every_n_steps,
            default_root_dir=root,
            callbacks=[checkpoint, StopOnInterrupt(), *bar, *callbacks],
            logger=logger,
            enable_progress_bar=opts.enable_progress_bar,
            use_distributed_sampler=False,  # the sampler shards by rank itself
            num_sanity_val_steps=0,
            **opts.extra,
        )
    except GPFMError:
        raise
    except Exception as exc:  # Lightning's MisconfigurationException, ValueError, ImportError...
        raise ConfigError(f"config trainer: {first_line(exc)}") from None


@dataclass
class FitRun:
    """What :func:`fit` built and ran."""

    trainer: Any
    module: Any
    datamodule: Any
    start_step: int = 0  # the resumed checkpoint's step


def prepare_fit(run: RunConfig, callbacks: Sequence[Any] = ()) -> FitRun:
    """Check the data, seed, build module, datamodule and trainer (nothing runs yet).

    Every user-fixable problem (data paths, manifests, expert weights, trainer options) raises
    here, before Lightning launches any process.
    """
    import lightning.pytorch as pl

    from gpfm_train.datamodule import GPFMDataModule
    from gpfm_train.module import GPFMPretrainModule

    datamodule = GPFMDataModule(run.data)
    datamodule.validate()
    pl.seed_everything(run.seed_everything, workers=False, verbose=False)
    module = GPFMPretrainModule(run.model)
    patch = module.distiller.student["backbone"].patch_embed.patch_size[0]
    if patch != run.data.masks.patch_size:
        raise ConfigError(
            f"data.masks.patch_size ({run.data.masks.patch_size}) must equal the backbone's "
            f"patch size ({patch})"
        )
    trainer = build_trainer(run, callbacks)
    return FitRun(trainer, module, datamodule)


# Three of Lightning's start-up warnings describe this design, not a fault, and only alarm
# users: the EMA teacher and the frozen experts stay in eval mode on purpose; with manual
# optimisation a checkpoint holds the state after its step, which is what resuming expects
# (tests/train/test_resume.py: a resumed run equals an uninterrupted one); and a resumed run
# writes into its own, non-empty checkpoint folder (run_fit refuses a fresh run there).
_EXPECTED_LIGHTNING_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Using ModelCheckpoint with manual optimization",
    r"Checkpoint directory .* exists and is not empty",
    # Lightning's pytree helper on torch >= 2.10: noise for the user, nothing to act on.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def fit(run: RunConfig, ckpt_path: str | None = None, callbacks: Sequence[Any] = ()) -> FitRun:
    """Train ``run`` (resuming from ``ckpt_path``: a ``.ckpt`` or ``"last"``)."""
    from gpfm_train.resume import (
        check_resumable,
        check_run_folder,
        read_checkpoint,
        resolve_checkpoint,
    )

    ckpt_dir = Path(run.trainer.default_root_dir).expanduser() / "checkpoints"
    path = resolve_checkpoint(ckpt_path, ckpt_dir)
    ckpt = None if path is None else read_checkpoint(path)
    check_run_folder(path, ckpt_dir)
    if path is not None and ckpt_path == "last" and not path.name.startswith("last"):
        _say(f"no last.ckpt in {ckpt_dir} (the run was killed): resuming from {path.name}")
    prepared = prepare_fit(run, callbacks)
    if ckpt is not None:
        for warning in check_resumable(ckpt, path, prepared.module):
            _say(f"warning: {warning}")
        prepared.start_step = int(ckpt.get("global_step") or 0)
        del ckpt  # memory-mapped; Lightning reads the file again itself
    with warnings.catch_warnings():
        for message in _EXPECTED_LIGHTNING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        prepared.trainer.fit(prepared.module, datamodule=prepared.datamodule,
                             ckpt_path=None if path is None else str(path))
    return prepared


def _resume_from(ckpt_dir: Path) -> str | None:
    """How to resume from the newest checkpoint in ``ckpt_dir``; None if there is none."""
    from gpfm_train.resume import resolve_checkpoint

    try:
        newest = resolve_checkpoint("last", ckpt_dir)
    except ConfigError:
        return None
    return f"resume from {newest} with the same command and --ckpt-path last"


def _newest_checkpoint(ckpt_dir: Path) -> str:
    return _resume_from(ckpt_dir) or f"no checkpoint was saved in {ckpt_dir}"


def run_fit(args: argparse.Namespace) -> int:
    import yaml

    from gpfm_train.interrupt import StopOnInterrupt

    overrides = parse_overrides(args.overrides) + parse_overrides(args.set or [])
    run = load_run_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(run.to_dict(), sort_keys=False), end="")
        return 0
    ckpt = args.ckpt_path
    ckpt_dir = Path(run.trainer.default_root_dir).expanduser() / "checkpoints"
    try:
        done = fit(run, ckpt)
    except TrainingError as exc:
        raise TrainingError(f"{exc}, then {_resume_from(ckpt_dir) or 'train again'}") from None
    except SystemExit:
        from gpfm_train.interrupt import aborted_by_user

        if not aborted_by_user():
            raise
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left it ignored
        _say(f"aborted by a second Ctrl-C: the step in flight is lost; {_newest_checkpoint(ckpt_dir)}")
        return 130
    last = done.trainer.checkpoint_callback.last_model_path or ckpt_dir / "last.ckpt"
    interrupt = next(c for c in done.trainer.callbacks if isinstance(c, StopOnInterrupt))
    if interrupt.stopped_at is not None:
        _say(f"interrupted: stopped after step {interrupt.stopped_at}, saved as {last}; resume "
             "with the same command and --ckpt-path last")
        return 130
    if done.trainer.global_step == done.start_step > 0:
        _say(f"the run had already reached step {done.start_step} (trainer.max_steps "
             f"{run.max_steps}); nothing to train. Checkpoints in {ckpt_dir}")
    else:
        _say(f"trained to step {done.trainer.global_step}; checkpoints in {ckpt_dir}")
    _say(f"export the teacher: gpfm-train export {last} --out model.safetensors")
    return 0


# ---------------------------------------------------------------------------- export
def run_export(args: argparse.Namespace) -> int:
    from gpfm_train.export import export_teacher
    from napari_gpfm.analysis._io import check_output_path
    from napari_gpfm.encoders.default_model import default_files

    if not Path(args.checkpoint).expanduser().exists():  # the input first, then the output
        raise WeightsError(f"checkpoint not found: {args.checkpoint}")
    out = args.out
    if out is None:
        if args.layout != "timm":
            raise ParameterError("--layout gpfm-release needs --out FILE.pth")
        out = default_files()[1]
        # The bundled default is what gpfm demo, the widgets and existing stores rely on:
        # building it when absent is the point of this default, replacing it takes a decision.
        if Path(out).exists() and not args.replace_default:
            raise ParameterError(
                f"{out} (napari_gpfm's embedded default model) exists; pass --out "
                "FILE.safetensors to export elsewhere, or --replace-default to replace it"
            )
    Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    check_output_path(Path(out).expanduser(), "the exported weights")
    result = export_teacher(args.checkpoint, out, layout=args.layout, card=args.card,
                            block_chunks=args.block_chunks)
    print(f"wrote {result.weights} ({result.layout} layout)")
    if result.description is not None:
        print(f"wrote {result.description}")
    if result.card is not None:
        print(f"wrote {result.card}")
    return 0


# ---------------------------------------------------------------------------- average
def run_average(args: argparse.Namespace) -> int:
    from gpfm_train.average import average_exports

    out = average_exports(args.weights, args.out)
    print(f"wrote {out} and {out.with_suffix('.json')} (mean of {len(args.weights)} teachers)")
    return 0


# ---------------------------------------------------------------------------- embed
def run_embed(args: argparse.Namespace) -> int:
    from gpfm_train.cohort import CohortOptions, read_cohort, run_cohort, summary_table
    slides = read_cohort(args.manifest, root=args.root, splits=args.split)
    options = CohortOptions(
        out=Path(args.out), model=args.model, weights=args.weights, models_dir=args.models_dir,
        mpp=args.mpp, slide_mpp=args.slide_mpp, read_size=args.read_size, stride=args.stride,
        min_tissue=args.min_tissue,
        batch_size=args.batch_size, workers=args.workers, precision=args.precision,
        pooling=args.pooling, dtype=args.dtype, patch_tokens=args.patch_tokens,
        overwrite=args.overwrite, limit=args.limit,
    )
    result = run_cohort(slides, options, accelerator=args.accelerator, devices=args.devices,
                        num_nodes=args.num_nodes)
    if result.interrupted:
        _say(f"interrupted: the tiles embedded so far are saved under {options.out}; run the "
             "same command again to resume")
        return 130
    if result.rank == 0:
        print(summary_table(result.summary))
    return 1 if result.failed else 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``gpfm-train`` argument parser."""
    from gpfm_train.manifest_cli import add_manifest_commands

    parser = argparse.ArgumentParser(
        prog="gpfm-train",
        description="GPFM pretraining on Lightning: fit, export, average, manifest, embed.",
    )
    commands = parser.add_subparsers(dest="command",
                                     metavar="{fit,export,average,manifest,embed}")
    commands.required = True

    fit_p = commands.add_parser(
        "fit",
        help="pretrain from a YAML run configuration",
        description="Pretrain GPFM (DINOv2 + expert distillation) from a run configuration. "
        "Overrides: --SECTION.KEY VALUE (or --set SECTION.KEY=VALUE). Packaged configs: "
        + ", ".join(packaged_configs()),
        epilog=LAUNCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit_p.add_argument("--config", required=True, help="YAML file or packaged config name")
    fit_p.add_argument("--ckpt-path", default=None,
                       help="resume from this checkpoint, or 'last' (exact resume)")
    fit_p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one option, e.g. trainer.max_steps=10 (repeatable)")
    fit_p.add_argument("--print-config", action="store_true",
                       help="print the checked configuration and exit")
    fit_p.set_defaults(func=run_fit, overrides=[])

    export_p = commands.add_parser(
        "export",
        help="write the EMA teacher of a checkpoint as an encoder",
        description="Export the teacher backbone of a gpfm-train checkpoint: timm layout "
        "(.safetensors + a .json description napari_gpfm loads as the 'default' encoder) or "
        "GPFM's release layout (.pth).",
    )
    export_p.add_argument("checkpoint", metavar="CKPT", help="a .ckpt written by gpfm-train fit")
    export_p.add_argument("--out", default=None,
                          help="output file (default: napari_gpfm's embedded default model, "
                          "napari_gpfm/encoders/weights/default.safetensors, if it is not "
                          "built yet)")
    export_p.add_argument("--replace-default", action="store_true",
                          help="without --out: replace the embedded default model")
    export_p.add_argument("--layout", default="timm", choices=("timm", "gpfm-release"))
    export_p.add_argument("--card", action="store_true", help="also write a model card (.md)")
    export_p.add_argument("--block-chunks", type=int, default=4,
                          help="FSDP block chunks of the release layout (GPFM: 4)")
    export_p.set_defaults(func=run_export)

    average_p = commands.add_parser(
        "average",
        help="average the weights of several exported teachers (stage ends of one network)",
        description="Write the uniform average of exported teachers of the same network "
        "(stochastic weight averaging across training stages) as one more export.",
    )
    average_p.add_argument("weights", nargs="+", metavar="WEIGHTS",
                           help="timm-layout exports (.safetensors with their .json)")
    average_p.add_argument("--out", required=True, help="output .safetensors (+ .json beside)")
    average_p.set_defaults(func=run_average)

    add_manifest_commands(commands)

    embed_p = commands.add_parser(
        "embed",
        help="embed the slides of a manifest across devices and nodes",
        description="Embed every slide of a slide manifest with an encoder into the same "
        "stores `gpfm embed` makes, one rank per slide, resumable; failing slides are recorded "
        "in OUT/_cohort/failures-rank<R>.json.",
        epilog="launching: --devices N starts N processes on this machine; on SLURM run "
        "`srun gpfm-train embed ... --devices G --num-nodes M`; with torchrun use "
        "`torchrun --nproc-per-node G -m gpfm_train.cli embed ... --devices G`.",
    )
    embed_p.add_argument("manifest", metavar="MANIFEST", help="slide manifest CSV")
    embed_p.add_argument("--model", default="default", help="encoder name or timm:<arch>")
    embed_p.add_argument("--weights", default=None, help="weights file for the encoder")
    embed_p.add_argument("--models-dir", default=None, help="folder searched for weights")
    embed_p.add_argument("--out", default="embeddings", help="output folder (./embeddings)")
    embed_p.add_argument("--devices", type=int, default=1, help="processes per node (1)")
    embed_p.add_argument("--num-nodes", type=int, default=1, help="nodes (1)")
    embed_p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu", "auto"))
    embed_p.add_argument("--root", default=None,
                         help="base of relative manifest paths (default: current directory)")
    embed_p.add_argument("--split", action="append", default=None,
                         help="only slides of this split (repeatable; default: all)")
    embed_p.add_argument("--mpp", type=float, default=None, help="tile um/px (encoder native)")
    embed_p.add_argument("--slide-mpp", type=slide_pixel_size, default=None,
                         help="level-0 um/px of slides that record none (their manifest row "
                              "neither); recorded values and the mpp column win")
    embed_p.add_argument("--read-size", type=int, default=None, help="tile side at --mpp")
    embed_p.add_argument("--stride", type=int, default=None, help="step between tiles")
    embed_p.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction (0.5)")
    embed_p.add_argument("--batch-size", type=int, default=64, help="tiles per batch (64)")
    embed_p.add_argument("--workers", type=int, default=2, help="tile reading threads (2)")
    embed_p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    embed_p.add_argument("--pooling", default="cls", choices=("cls", "mean", "cls+mean"))
    embed_p.add_argument("--dtype", default=None, choices=("float16", "float32"),
                         help="feature precision of new stores (default float16)")
    embed_p.add_argument("--patch-tokens", action="store_true", help="also store patch tokens")
    embed_p.add_argument("--overwrite", action="store_true", help="replace existing stores")
    embed_p.add_argument("--limit", type=int, default=None, help="at most N tiles per slide")
    embed_p.set_defaults(func=run_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gpfm-train``: errors a user can fix print one line and exit 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "fit":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    try:
        return int(args.func(args))
    except GPFMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the file system refused something the checks let through
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return GPFMError.exit_code


if __name__ == "__main__":
    sys.exit(main())
