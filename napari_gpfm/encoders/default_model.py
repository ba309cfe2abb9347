"""The small encoder embedded in the package, described by a JSON file beside its weights.

``napari_gpfm/encoders/weights/default.json`` names the timm architecture, its keyword
arguments, the preprocessing and the output size; ``default.safetensors`` (timm layout) holds
the weights. ``gpfm-train export`` writes both with :meth:`DefaultModelConfig.write`, so the
trainer decides the model's size and this loader needs no change.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_gpfm.errors import WeightsError

FORMAT_VERSION = 1
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_STEM = "default"
NOT_BUILT_HINT = (
    "the embedded default model is not built yet: build it with "
    "`gpfm-train fit --config tiny_cpu.yaml` then `gpfm-train export` (it writes default.json "
    "and default.safetensors into napari_gpfm/encoders/weights/), or pick another encoder "
    "such as gpfm with --weights PATH"
)


@dataclass(frozen=True)
class DefaultModelConfig:
    """Contents of ``default.json``.

    ``architecture`` + ``model_kwargs`` go to ``timm.create_model`` (``num_classes`` is
    forced to 0). ``patch_size`` and ``token_dim`` are optional: when both are given the
    registry describes the model without importing torch; otherwise they are read from the
    architecture.
    """

    architecture: str
    embed_dim: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    native_mpp: float = 0.5
    native_read_size: int = 256
    display_name: str = "Embedded default model (napari-gpfm)"
    licence: str = "Apache-2.0"
    citation: str = "napari-gpfm embedded default model, trained with gpfm_train"
    notes: str = ""
    patch_size: int | None = None
    token_dim: int | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> DefaultModelConfig:
        """Parse and validate a ``default.json``; :class:`WeightsError` names what is wrong."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"default model description {path} is unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise WeightsError(f"default model description {path} must hold a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        missing = sorted({"architecture", "embed_dim"} - set(data))
        if unknown or missing:
            what = "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unknown keys {', '.join(unknown)}" if unknown else "",
                )
                if part
            )
            raise WeightsError(f"default model description {path}: {what}; re-export it")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise WeightsError(
                f"default model description {path} has format_version "
                f"{data['format_version']}, this napari-gpfm reads {FORMAT_VERSION}; re-export it"
            )
        try:
            config = cls(
                **{
                    **data,
                    "mean": tuple(float(v) for v in data.get("mean", cls.mean)),
                    "std": tuple(float(v) for v in data.get("std", cls.std)),
                    "model_kwargs": dict(data.get("model_kwargs", {})),
                }
            )
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"default model description {path} is invalid ({exc})") from None
        config.validate(path)
        return config

    def validate(self, path: Path | str = "default.json") -> None:
        """Check types and ranges; raise :class:`WeightsError` naming the field."""
        checks = [
            (isinstance(self.architecture, str) and bool(self.architecture), "architecture"),
            (isinstance(self.embed_dim, int) and self.embed_dim > 0, "embed_dim"),
            (isinstance(self.input_size, int) and self.input_size > 0, "input_size"),
            (len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "mean/std"),
            (self.interpolation in ("bicubic", "bilinear"), "interpolation"),
            (float(self.native_mpp) > 0, "native_mpp"),
            (
                isinstance(self.native_read_size, int) and self.native_read_size > 0,
                "native_read_size",
            ),
            (
                self.patch_size is None
                or (isinstance(self.patch_size, int) and self.patch_size > 0),
                "patch_size",
            ),
            (
                self.token_dim is None or (isinstance(self.token_dim, int) and self.token_dim > 0),
                "token_dim",
            ),
        ]
        for ok, name in checks:
            if not ok:
                raise WeightsError(f"default model description {path}: invalid {name}")

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write this description as JSON (the trainer's export calls this)."""
        self.validate(path)
        path = Path(path)
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        from napari_gpfm.analysis._io import atomic_write_text

        return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n",
                                 "model description")


def default_files(
    weights_dir: str | os.PathLike[str] | None = None, stem: str = DEFAULT_STEM
) -> tuple[Path, Path]:
    """``(json, safetensors)`` paths of the default model in ``weights_dir`` (package folder)."""
    folder = Path(weights_dir) if weights_dir is not None else PACKAGE_WEIGHTS_DIR
    return folder / f"{stem}.json", folder / f"{stem}.safetensors"


def default_spec(weights_dir: str | os.PathLike[str] | None = None, stem: str = DEFAULT_STEM):
    """The :class:`EncoderSpec` of the default model described in ``weights_dir``.

    Raises :class:`WeightsError` with build instructions while ``default.json`` is absent.
    """
    from napari_gpfm.encoders.builders import TimmBuilder, describe_timm_architecture
    from napari_gpfm.encoders.registry import DEFAULT_NAME, EncoderSpec

    json_path, weights_path = default_files(weights_dir, stem)
    if not json_path.is_file():
        raise WeightsError(f"{NOT_BUILT_HINT} (no {json_path})")
    config = DefaultModelConfig.read(json_path)
    kwargs = {**config.model_kwargs, "num_classes": 0}
    builder = TimmBuilder(config.architecture, tuple(sorted(kwargs.items())))
    patch_size, token_dim = config.patch_size, config.token_dim
    if patch_size is None or token_dim is None:
        try:
            shape = describe_timm_architecture(builder)
        except Exception as exc:  # unknown architecture or kwargs timm rejects
            raise WeightsError(
                f"default model description {json_path}: timm cannot build "
                f"{config.architecture!r} with {config.model_kwargs} ({exc})"
            ) from None
        if shape.embed_dim != config.embed_dim:
            raise WeightsError(
                f"default model description {json_path}: embed_dim {config.embed_dim} but "
                f"{config.architecture} gives {shape.embed_dim}; re-export it"
            )
        patch_size, token_dim = shape.patch_size, shape.token_dim
    patch_grid = config.input_size // patch_size if patch_size else None
    return EncoderSpec(
        name=DEFAULT_NAME,
        display_name=config.display_name,
        builder=builder,
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
        interpolation=config.interpolation,
        native_mpp=float(config.native_mpp),
        native_read_size=config.native_read_size,
        embed_dim=config.embed_dim,
        token_dim=token_dim,
        patch_size=patch_size,
        patch_grid=patch_grid,
        layouts=("timm",),
        weights_filenames=(weights_path.name,),
        licence=config.licence,
        citation=config.citation,
        url="",
        bundled_dir=weights_path.parent,
        notes=config.notes,
    )


def write_random_twin(
    weights: str | os.PathLike[str], folder: str | os.PathLike[str], seed: int = 0
) -> Path:
    """The network described beside ``weights`` with random weights (``seed``): the baseline
    that tells what training added. Written as ``default-random.safetensors`` + JSON in
    ``folder``; load it with ``load_encoder("default", weights=<returned path>)``."""
    import dataclasses

    import timm
    import torch

    from napari_gpfm.encoders.checkpoints import TIMM_METADATA, safetensors_bytes

    weights = Path(weights)
    config = DefaultModelConfig.read(weights.with_suffix(".json"))
    torch.manual_seed(seed)
    model = timm.create_model(config.architecture, **config.model_kwargs, num_classes=0)
    out = Path(folder) / "default-random.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out.write_bytes(safetensors_bytes(state, TIMM_METADATA))
    dataclasses.replace(config, notes=f"random weights (seed {seed}) of {weights.name}'s "
                        "network").write(out.with_suffix(".json"))
    return out
