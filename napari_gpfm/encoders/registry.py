"""The encoder registry: what each encoder is, where its weights live, how to feed it.

An :class:`EncoderSpec` is plain data (plus a builder callable). Nothing here imports torch or
timm at module import: the built-in entries reference their builders lazily, and only the
dynamic ``timm:<architecture>`` entries touch timm (to read the architecture's shape).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_gpfm.errors import EncoderNotFoundError, WeightsError

MODELS_DIR_ENV = "GPFM_MODELS_DIR"
TIMM_PREFIX = "timm:"
DEFAULT_NAME = "default"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear")

# A generic timm model has no known pathology field of view: assume the common 20x setting.
GENERIC_MPP = 0.5


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build, load and feed one encoder.

    ``builder()`` returns a freshly initialised ``torch.nn.Module`` that follows timm's feature
    protocol: ``forward_features(x)`` gives final-normed tokens ``(B, N, D_tokens)`` (or a
    feature map ``(B, C, h, w)``), ``forward_head(features, pre_logits=True)`` gives the image
    embedding ``(B, embed_dim)`` and ``num_prefix_tokens`` says how many leading tokens are not
    patches. Its ``state_dict()`` keys are the target ("timm") key layout every checkpoint
    layout is converted to.

    ``native_read_size`` pixels at ``native_mpp`` um/px is the field of view the model was
    trained on; a tile of that size is resized to ``input_size`` with ``interpolation`` and
    normalised with ``mean``/``std``. ``weights_filenames`` are looked up (in order) in
    ``bundled_dir`` (weights shipped inside the package) and then in the models folder.
    ``url`` says where a user can obtain the weights; nothing is ever downloaded.
    """

    name: str
    display_name: str
    builder: Callable[[], Any]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    native_mpp: float
    native_read_size: int
    embed_dim: int
    patch_size: int | None
    patch_grid: int | None
    layouts: tuple[str, ...]
    weights_filenames: tuple[str, ...]
    licence: str
    citation: str
    url: str
    token_dim: int | None = None
    bundled_dir: Path | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"EncoderSpec {self.name!r}: interpolation must be one of {INTERPOLATIONS}, "
                f"not {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"EncoderSpec {self.name!r}: mean and std need 3 values each")
        if not self.layouts or not self.weights_filenames:
            raise ValueError(f"EncoderSpec {self.name!r}: needs layouts and weights_filenames")

    @property
    def field_of_view_um(self) -> float:
        """Side of the native tile in micrometres."""
        return self.native_read_size * self.native_mpp


_REGISTRY: dict[str, EncoderSpec] = {}
_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from napari_gpfm.encoders import catalog  # noqa: F401  (registers on import)


def register(spec: EncoderSpec, *, replace: bool = False) -> EncoderSpec:
    """Add ``spec`` to the registry under ``spec.name`` (lower case) and return it.

    Names are unique; pass ``replace=True`` to overwrite an entry on purpose. The
    ``timm:`` prefix and the name ``default`` are reserved.
    """
    key = spec.name.lower()
    if key.startswith(TIMM_PREFIX) or key == DEFAULT_NAME:
        raise ValueError(f"encoder name {spec.name!r} is reserved")
    if key != spec.name:
        raise ValueError(f"encoder names are lower case: {spec.name!r}")
    if key in _REGISTRY and not replace:
        raise ValueError(f"an encoder named {spec.name!r} is already registered")
    _REGISTRY[key] = spec
    return spec


def known_names() -> list[str]:
    """Every name :func:`get_spec` accepts (``timm:<architecture>`` aside), sorted."""
    _ensure_builtins()
    return sorted({*_REGISTRY, DEFAULT_NAME})


def get_spec(name: str) -> EncoderSpec:
    """Return the spec registered as ``name`` (case-insensitive).

    ``timm:<architecture>`` resolves any timm architecture dynamically. ``default`` is the
    small model embedded in the package; it raises :class:`WeightsError` until it is built.
    Unknown names raise :class:`EncoderNotFoundError` listing the known names.
    """
    _ensure_builtins()
    if not isinstance(name, str) or not name.strip():
        raise EncoderNotFoundError(f"no encoder name given; {_known_names_hint()}")
    key = name.strip()
    if key.lower().startswith(TIMM_PREFIX):
        return timm_spec(key[len(TIMM_PREFIX) :])
    key = key.lower()
    if key == DEFAULT_NAME:
        from napari_gpfm.encoders.default_model import default_spec

        return default_spec()
    try:
        return _REGISTRY[key]
    except KeyError:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise EncoderNotFoundError(
            f"no encoder named {name!r}{maybe}; {_known_names_hint()}"
        ) from None


def _known_names_hint() -> str:
    return (
        f"known encoders: {', '.join(known_names())}, or timm:<architecture> "
        "(any timm model, with its weights file)"
    )


def list_specs() -> list[EncoderSpec]:
    """The registered specs sorted by name, plus ``default`` once its files exist."""
    _ensure_builtins()
    specs = [_REGISTRY[k] for k in sorted(_REGISTRY)]
    with contextlib.suppress(WeightsError):  # not built yet: model_table() reports it
        specs.append(get_spec(DEFAULT_NAME))
    return sorted(specs, key=lambda s: s.name)


def models_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The folder searched for weights files.

    ``override`` if given, else ``$GPFM_MODELS_DIR``, else ``~/.cache/napari-gpfm/models``.
    The folder need not exist.
    """
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(MODELS_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "napari-gpfm" / "models"


def search_dirs(spec: EncoderSpec, models_dir_: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders :func:`find_weights` looks in for ``spec``, in order."""
    dirs = [spec.bundled_dir] if spec.bundled_dir is not None else []
    return [*dirs, models_dir(models_dir_)]


def find_weights(
    spec: EncoderSpec, models_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """The first existing weights file for ``spec`` (see :func:`search_dirs`), else None."""
    for folder in search_dirs(spec, models_dir):
        for filename in spec.weights_filenames:
            candidate = folder / filename
            if candidate.is_file():
                return candidate
    return None


@dataclass(frozen=True)
class ModelStatus:
    """One row of a ``gpfm models`` listing."""

    name: str
    display_name: str
    weights: Path | None
    licence: str
    url: str
    note: str


def model_table(models_dir: str | os.PathLike[str] | None = None) -> list[ModelStatus]:
    """Every registered encoder with its weights file (or None), including ``default``.

    ``default`` appears even before it is built, with a note saying how to build it.
    """
    rows = []
    for spec in list_specs():
        found = find_weights(spec, models_dir)
        note = ""
        if found is None:
            names = ", ".join(spec.weights_filenames)
            note = f"weights not found: put one of {names} in {search_dirs(spec, models_dir)[-1]}"
        rows.append(ModelStatus(spec.name, spec.display_name, found, spec.licence, spec.url, note))
    if not any(row.name == DEFAULT_NAME for row in rows):
        from napari_gpfm.encoders.default_model import NOT_BUILT_HINT

        rows.append(
            ModelStatus(DEFAULT_NAME, "Embedded default model", None, "", "", NOT_BUILT_HINT)
        )
    return sorted(rows, key=lambda r: r.name)


@functools.lru_cache(maxsize=64)
def timm_spec(architecture: str) -> EncoderSpec:
    """A spec for any timm architecture, its preprocessing read from timm's pretrained cfg.

    DINOv2 architectures are built at 224 px (their timm default is 518). Weights are looked
    up as ``<architecture>.safetensors`` / ``.pth`` / ``.bin`` in the models folder.
    """
    from napari_gpfm.encoders.builders import TimmBuilder, describe_timm_architecture

    arch = architecture.strip()
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a hard dependency
        raise EncoderNotFoundError(
            f"timm is not installed, so 'timm:{arch}' cannot be used"
        ) from exc
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        maybe = f"; close matches: {', '.join(close)}" if close else ""
        raise EncoderNotFoundError(
            f"timm has no architecture {arch!r} (timm {timm.__version__}){maybe}; "
            "see timm.list_models() for the names"
        )
    kwargs: dict[str, Any] = {"num_classes": 0}
    if "dinov2" in arch:
        kwargs["img_size"] = 224
    builder = TimmBuilder(arch, tuple(sorted(kwargs.items())))
    shape = describe_timm_architecture(builder)
    cfg = shape.pretrained_cfg
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bilinear"
    input_size = shape.input_size
    return EncoderSpec(
        name=f"{TIMM_PREFIX}{arch}",
        display_name=f"timm {arch}",
        builder=builder,
        input_size=input_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=interpolation,
        native_mpp=GENERIC_MPP,
        native_read_size=input_size,
        embed_dim=shape.embed_dim,
        patch_size=shape.patch_size,
        patch_grid=shape.patch_grid,
        token_dim=shape.token_dim,
        layouts=("timm", "dinov2") if "dinov2" in arch else ("timm",),
        weights_filenames=(f"{arch}.safetensors", f"{arch}.pth", f"{arch}.bin"),
        licence=str(cfg.get("license", "see the weights' source")),
        citation=str(cfg.get("paper_ids", "") or ""),
        url=_timm_weights_url(cfg),
        notes=(
            "generic timm model: field of view assumed 20x (0.5 um/px) at the model's input "
            "size; embedding = timm forward_head(pre_logits=True)"
        ),
    )


def _timm_weights_url(cfg: dict[str, Any]) -> str:
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        return f"https://huggingface.co/{hub_id}"
    return str(cfg.get("url", "") or "")
