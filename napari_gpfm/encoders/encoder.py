"""A loaded encoder: backbone + weights identity + on-device preprocessing."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_gpfm.encoders.builders import instantiate_on_meta
from napari_gpfm.encoders.checkpoints import non_finite_tensors, read_checkpoint, weights_sha256
from napari_gpfm.encoders.layouts import (
    LAYOUTS,
    abridge,
    check_fit,
    convert,
    detect_layout,
    unwrap,
)
from napari_gpfm.encoders.registry import (
    DEFAULT_NAME,
    MODELS_DIR_ENV,
    EncoderSpec,
    find_weights,
    get_spec,
    models_dir,
    search_dirs,
)
from napari_gpfm.errors import ParameterError, WeightsError


class Encoder(nn.Module):
    """A frozen image encoder in eval mode.

    ``forward(x)`` takes resized, normalised float images ``(B, 3, S, S)`` and returns
    ``{"cls": (B, embed_dim)}``, plus ``"patch_tokens": (B, h, w, token_dim)`` when
    ``patch_tokens=True`` (final-normed patch tokens for ViTs, the last feature map for CNNs).
    ``preprocess_on_device`` turns uint8 tiles into that input on the encoder's device.
    ``train()`` keeps it in eval mode and its parameters never require gradients.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        backbone: nn.Module,
        *,
        weights_path: Path,
        weights_sha256: str,
        checkpoint_layout: str,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.weights_path = Path(weights_path)
        self.weights_sha256 = weights_sha256
        self.checkpoint_layout = checkpoint_layout
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def embed_dim(self) -> int:
        """Size of the image embedding ``"cls"``."""
        return self.spec.embed_dim

    @property
    def token_dim(self) -> int | None:
        """Size of each patch token, None when the encoder has none."""
        return self.spec.token_dim

    @property
    def encoder_id(self) -> str:
        """Stable identity of encoder + weights, e.g. ``gpfm@0123456789ab``."""
        return f"{self.spec.name}@{self.weights_sha256[:12]}"

    @property
    def device(self) -> torch.device:
        """Device the encoder's tensors live on."""
        return self.mean.device

    def train(self, mode: bool = True) -> Encoder:
        """Stay in eval mode: encoders are frozen feature extractors."""
        return super().train(False)

    def forward(self, x: torch.Tensor, patch_tokens: bool = False) -> dict[str, torch.Tensor]:
        """Embed ``x`` ``(B, 3, S, S)``; see the class docstring for the outputs."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, S, S), got {tuple(x.shape)}")
        features = self.backbone.forward_features(x)
        out = {"cls": self.backbone.forward_head(features, pre_logits=True)}
        if patch_tokens:
            out["patch_tokens"] = self._token_grid(features, x.shape[-2], x.shape[-1])
        return out

    def _token_grid(self, features: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if features.ndim == 4:  # CNN feature map (B, C, h, w)
            return features.permute(0, 2, 3, 1)
        tokens = features[:, self.num_prefix_tokens :]
        patch = self.spec.patch_size
        if not patch:
            raise ValueError(f"encoder {self.spec.name!r} has no patch tokens")
        rows, cols = height // patch, width // patch
        if rows * cols != tokens.shape[1]:
            raise ValueError(
                f"{tokens.shape[1]} patch tokens do not form a {rows}x{cols} grid "
                f"for a {height}x{width} input"
            )
        return tokens.reshape(tokens.shape[0], rows, cols, tokens.shape[-1])

    def preprocess_on_device(self, images: Any) -> torch.Tensor:
        """uint8 tiles ``(B, H, W, 3)`` (tensor or array) -> model input ``(B, 3, S, S)``.

        Moves the bytes to the encoder's device first (4x less to transfer than floats),
        then converts to float in [0, 1], resizes to ``input_size`` with the spec's
        interpolation (antialiased, clamped to [0, 1] like an 8-bit image resize) and
        normalises with the spec's mean/std. Returns float32.
        """
        if not isinstance(images, torch.Tensor):
            import numpy as np

            images = torch.from_numpy(np.ascontiguousarray(images))
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                f"expected uint8 tiles of shape (B, H, W, 3), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        size = self.spec.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x,
                size=(size, size),
                mode=self.spec.interpolation,
                align_corners=False,
                antialias=True,
            ).clamp_(0.0, 1.0)
        return ((x - self.mean) / self.std).contiguous()

    def metadata(self) -> dict[str, Any]:
        """Plain-data description of this encoder, for provenance in stores and exports."""
        spec = self.spec
        return {
            "encoder": spec.name,
            "encoder_id": self.encoder_id,
            "weights_sha256": self.weights_sha256,
            "weights_file": self.weights_path.name,
            "checkpoint_layout": self.checkpoint_layout,
            "embed_dim": spec.embed_dim,
            "token_dim": spec.token_dim,
            "input_size": spec.input_size,
            "patch_size": spec.patch_size,
            "patch_grid": spec.patch_grid,
            "interpolation": spec.interpolation,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "native_mpp": spec.native_mpp,
            "native_read_size": spec.native_read_size,
        }

    def extra_repr(self) -> str:
        return f"encoder_id={self.encoder_id!r}, layout={self.checkpoint_layout!r}"


def load_encoder(
    name: str | EncoderSpec,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    models_dir: str | os.PathLike[str] | None = None,
) -> Encoder:
    """Build encoder ``name`` and load its weights; return it in eval mode on ``device``.

    ``weights`` is a checkpoint path; without it the spec's file names are searched in the
    models folder (``models_dir``, else ``$GPFM_MODELS_DIR``, else ``~/.cache/napari-gpfm/
    models``). For ``default``, a ``default.json`` beside ``weights`` describes the model.
    Raises :class:`WeightsError` (missing, unsafe or non-fitting file),
    :class:`EncoderNotFoundError` (unknown name) or :class:`ParameterError` (bad device).
    """
    weights_path = Path(weights).expanduser() if weights is not None else None
    spec = _resolve_spec(name, weights_path)
    target = _resolve_device(device)
    if weights_path is None:
        weights_path = _find_or_explain(spec, models_dir)

    # The identity hash reads the whole file (1.2 GB for a ViT-L): hashlib releases the GIL,
    # so it runs beside the reading, the checks and the build (bench/bench_weights_checks.py).
    # Nothing waits for it if loading fails.
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-sha256")
    identity = hashing.submit(weights_sha256, weights_path)
    hashing.shutdown(wait=False)
    raw = read_checkpoint(weights_path)
    state = unwrap(raw, weights_path)
    layout = detect_layout(state)
    if layout not in spec.layouts:
        raise WeightsError(
            f"weights file {weights_path} looks like a '{layout}' checkpoint "
            f"({LAYOUTS[layout]}), but encoder '{spec.name}' reads "
            f"{', '.join(repr(x) for x in spec.layouts)}; pass the checkpoint made for "
            f"'{spec.name}' or choose the matching encoder"
        )
    tensors = convert(state, layout, weights_path)
    del raw, state
    broken = non_finite_tensors(tensors)
    if broken:
        raise WeightsError(
            f"weights file {weights_path} holds NaN or infinite values in {len(broken)} "
            f"tensor(s) ({abridge(broken)}): the training run that wrote it diverged, or the "
            "file is damaged; use an earlier checkpoint or get the file again"
        )
    backbone = _build_with_weights(spec, tensors, weights_path, layout)
    encoder = Encoder(
        spec,
        backbone,
        weights_path=weights_path,
        weights_sha256=identity.result(),
        checkpoint_layout=layout,
    )
    try:
        return encoder.to(target)
    except (RuntimeError, AssertionError) as exc:
        raise ParameterError(f"device={str(device)!r} cannot be used here ({exc})") from None


def _resolve_spec(name: str | EncoderSpec, weights: Path | None) -> EncoderSpec:
    if isinstance(name, EncoderSpec):
        return name
    if isinstance(name, str) and name.strip().lower() == DEFAULT_NAME and weights is not None:
        from napari_gpfm.encoders.default_model import default_spec

        if weights.with_suffix(".json").is_file():
            return default_spec(weights.parent, weights.stem)
        try:
            return get_spec(name)
        except WeightsError:
            raise WeightsError(
                f"default model weights {weights} need their description "
                f"{weights.with_suffix('.json')} beside them (gpfm-train export writes both)"
            ) from None
    return get_spec(name)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError(
            f"device={device!r} is not a device name; use cpu, cuda, cuda:N or mps ({exc})"
        ) from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device={str(device)!r}: no CUDA GPU is available; use device=cpu")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise ParameterError(f"device={str(device)!r}: MPS is not available; use device=cpu")
    return target


def _find_or_explain(spec: EncoderSpec, models_dir_: str | os.PathLike[str] | None) -> Path:
    found = find_weights(spec, models_dir_)
    if found is not None:
        return found
    if spec.name == DEFAULT_NAME:
        from napari_gpfm.encoders.default_model import NOT_BUILT_HINT

        raise WeightsError(f"{NOT_BUILT_HINT} (no {spec.weights_filenames[0]})")
    folders = " or ".join(str(d) for d in search_dirs(spec, models_dir_))
    source = f"; get it from {spec.url}" if spec.url else ""
    raise WeightsError(
        f"no weights for encoder '{spec.name}': looked for {', '.join(spec.weights_filenames)} "
        f"in {folders}; pass --weights PATH (gpfm eval: --models {spec.name}=PATH) or put the "
        f"file in ${MODELS_DIR_ENV} "
        f"(now {models_dir(models_dir_)}){source}"
    )


def _build_with_weights(
    spec: EncoderSpec, tensors: dict[str, torch.Tensor], path: Path, layout: str
) -> nn.Module:
    # Building on the meta device and assigning the file's tensors skips initialising
    # weights that are overwritten anyway (seconds for a ViT-L). Models whose non-persistent
    # buffers are computed at build time are built normally and loaded by copy instead.
    model = instantiate_on_meta(spec.builder)
    assign = model is not None and _state_covers_everything(model) and not _meta_attributes(model)
    if not assign:
        model = spec.builder()
    produced = int(getattr(model, "head_hidden_size", None) or model.num_features)
    if produced != spec.embed_dim:
        raise WeightsError(
            f"encoder '{spec.name}' is described with embed_dim {spec.embed_dim} but its "
            f"architecture produces {produced}; fix the model description"
        )
    check_fit(model.state_dict(), tensors, path=path, layout=layout, encoder=spec.name)
    model.load_state_dict(tensors, strict=True, assign=assign)
    model.float()  # half-precision checkpoints run in fp32 unless the caller autocasts
    return model


def _meta_attributes(model: nn.Module) -> bool:
    """True if a module keeps plain tensor attributes (e.g. cached tables) outside its state."""
    return any(
        isinstance(value, torch.Tensor) and value.is_meta
        for module in model.modules()
        for value in vars(module).values()
    )


def _state_covers_everything(model: nn.Module) -> bool:
    saved = set(model.state_dict())
    return all(name in saved for name, _ in model.named_buffers()) and all(
        name in saved for name, _ in model.named_parameters()
    )
