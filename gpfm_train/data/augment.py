"""DINOv2 multi-crop augmentation (GPFM note §2.2), on torchvision.transforms.v2.

Per image: two global crops and ``local_crops_number`` local crops.

* geometry: ``RandomResizedCrop(size, scale, bicubic)`` then ``RandomHorizontalFlip(0.5)``;
  optionally (off in the recipe) a vertical flip and a rotation by 90 / 180 / 270 degrees, the
  orientations a slide has no preference among (``vflip_p``, ``rot90_p``);
* colour: ``RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8)`` then ``RandomGrayscale(0.2)``;
  optionally (off in the recipe) a stain jitter before them, which scales and shifts the
  haematoxylin / eosin / DAB optical densities instead of RGB (``stain_jitter``);
* blur: ``GaussianBlur(kernel 9, sigma U(0.1, 2.0))``; solarise ``RandomSolarize(128, p=0.2)`` on
  global crop 2 only (after its blur);
* ``ToDtype(float32, scale=True)`` and ImageNet ``Normalize``.

Optionally (off in the recipe, ``clean_global_crops``) each sample also carries its two global
crops before colour, blur and solarisation (``"global_crops_clean"``: the same geometry, the
tile's own colours), for an expert whose target should not follow the photometric jitter.

The blur quirk. DINOv2 (and GPFM) configure the blur as ``GaussianBlur(p=1.0)`` for global crop 1,
``p=0.1`` for global crop 2 and ``p=0.5`` for local crops, but their ``GaussianBlur`` subclasses
``RandomApply`` and passes it ``p=1 - p``, and ``RandomApply`` *applies* with its ``p``. So the
blur is really applied with probability 0.0 (global 1), 0.9 (global 2) and 0.5 (local). This
module keeps the configured values (``blur_p``) and, with ``dinov2_blur_quirk=True`` (default),
applies them the same way; ``False`` applies them as written.

Determinism. torchvision draws from torch's global generator, so each call runs under
``torch.random.fork_rng`` seeded with :func:`sample_seed` ``(seed, index, position)``: the same
sample at the same stream position gets the same crops in any worker, on any rank, after a
resume; the caller's RNG state is left untouched. Run it in worker *processes* (the DataLoader
default), not threads that share the global generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from napari_gpfm.errors import ParameterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MultiCropConfig:
    """Every number of the multi-crop augmentation; defaults are GPFM's (note §2.1-2.2).

    A tiny CPU configuration: ``MultiCropConfig(global_crops_size=112, local_crops_size=56,
    local_crops_number=2)`` (8x8 and 4x4 grids of patch-14 tokens).
    """

    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_size: int = 98
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    local_crops_number: int = 8
    hflip_p: float = 0.5
    # Not in GPFM's recipe: tissue on a slide has no up or down, so a vertical flip and quarter
    # turns (with the horizontal flip: all 8 orientations) are free extra views of a tile.
    vflip_p: float = 0.0
    rot90_p: float = 0.0
    # Not in GPFM's recipe: jitter in stain space (Ruifrok-Johnston H / E / DAB optical
    # densities, each multiplied by U(1 - a, 1 + a) and shifted by U(-b, b) for (a, b) =
    # stain_jitter; Tellez et al. 2018 call (0.05, 0.05) "HED-light"). Unlike a hue jitter it
    # keeps eosin eosin and haematoxylin haematoxylin while the staining varies in strength.
    stain_jitter: tuple[float, float] = (0.0, 0.0)
    stain_jitter_p: float = 0.0
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # Configured blur probabilities for (global 1, global 2, local), as DINOv2 writes them.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    dinov2_blur_quirk: bool = True
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: int = 128
    solarize_p: float = 0.2
    # Not in GPFM's recipe: also return the global crops before any photometric change. They
    # draw nothing from the generator, so every other crop stays the same with or without them.
    clean_global_crops: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("global_crops_size", "local_crops_size"):
            if int(getattr(self, name)) < 8:
                raise ParameterError(f"{name}={getattr(self, name)} must be at least 8 px")
        if self.local_crops_number < 0:
            raise ParameterError(f"local_crops_number={self.local_crops_number} must be >= 0")
        for name in ("global_crops_scale", "local_crops_scale", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ParameterError(f"{name}={getattr(self, name)} must satisfy 0 < min <= max")
        for name in ("global_crops_scale", "local_crops_scale"):
            if getattr(self, name)[1] > 1:
                raise ParameterError(
                    f"{name}={getattr(self, name)}: the area fraction is at most 1"
                )
        probs = {
            "hflip_p": self.hflip_p,
            "vflip_p": self.vflip_p,
            "rot90_p": self.rot90_p,
            "stain_jitter_p": self.stain_jitter_p,
            "color_jitter_p": self.color_jitter_p,
            "grayscale_p": self.grayscale_p,
            "solarize_p": self.solarize_p,
            **{f"blur_p[{i}]": p for i, p in enumerate(self.blur_p)},
        }
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ParameterError(f"{name}={p} is a probability: it must lie in [0, 1]")
        if len(self.stain_jitter) != 2 or not all(0 <= v < 1 for v in self.stain_jitter):
            raise ParameterError(
                f"stain_jitter={self.stain_jitter} needs (scale, shift), each in [0, 1)"
            )
        if len(self.blur_p) != 3:
            raise ParameterError(f"blur_p={self.blur_p} needs 3 values (global 1, global 2, local)")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ParameterError(f"blur_kernel_size={self.blur_kernel_size} must be odd and >= 1")

    @property
    def effective_blur_p(self) -> tuple[float, float, float]:
        """The probabilities with which the blur is really applied."""
        if self.dinov2_blur_quirk:
            return tuple(1.0 - p for p in self.blur_p)  # type: ignore[return-value]
        return tuple(self.blur_p)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_seed(seed: int, index: int, position: int = 0) -> int:
    """A 64-bit seed for one draw of one sample: a hash of (run seed, dataset index, position).

    ``position`` is the sample's place in the global sampler stream (it grows with every pass
    over the data, so a tile drawn again in a later pass gets new crops).
    """
    state = np.random.SeedSequence([int(seed), int(index), int(position)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)


class MultiCropAugmentation:
    """Callable: ``aug(image, seed=None) -> {"global_crops": [...], "local_crops": [...]}``.

    ``image`` is an ``(H, W, 3)`` uint8 array, a ``(3, H, W)`` uint8 tensor or a PIL image. Each
    crop is a float32 ``(3, S, S)`` tensor, normalised.
    """

    def __init__(self, config: MultiCropConfig | None = None) -> None:
        from torchvision.transforms import v2

        self.config = cfg = config or MultiCropConfig()
        bicubic = v2.InterpolationMode.BICUBIC

        def geometry(size: int, scale: tuple[float, float]) -> v2.Compose:
            steps = [
                v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                v2.RandomHorizontalFlip(p=cfg.hflip_p),
            ]
            # Added only when asked for: every transform draws from the generator even at p=0,
            # which would change the recipe's crops (and the default model's reproduction).
            if cfg.vflip_p > 0:
                steps.append(v2.RandomVerticalFlip(p=cfg.vflip_p))
            if cfg.rot90_p > 0:
                steps.append(_RandomQuarterTurn(cfg.rot90_p))
            return v2.Compose(steps)

        def blur(p: float) -> v2.RandomApply:
            kernel = v2.GaussianBlur(kernel_size=cfg.blur_kernel_size, sigma=cfg.blur_sigma)
            return v2.RandomApply([kernel], p=p)

        b, c, s, h = cfg.color_jitter
        # Like the geometry options, added only when on, so the recipe's random stream stays.
        stain = (
            [_RandomStainJitter(*cfg.stain_jitter, p=cfg.stain_jitter_p)]
            if cfg.stain_jitter_p > 0 and any(cfg.stain_jitter)
            else []
        )
        colour = v2.Compose(
            [
                *stain,
                v2.RandomApply(
                    [v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)],
                    p=cfg.color_jitter_p,
                ),
                v2.RandomGrayscale(p=cfg.grayscale_p),
            ]
        )
        # Colour runs on PIL images (torchvision's tensor hue jitter is ~30x slower); blur,
        # solarise and normalisation on the uint8 tensor.
        normalise = v2.Compose(
            [v2.ToDtype(_float32(), scale=True), v2.Normalize(mean=cfg.mean, std=cfg.std)]
        )
        p1, p2, pl = cfg.effective_blur_p
        self._global_geometry = geometry(cfg.global_crops_size, cfg.global_crops_scale)
        self._local_geometry = geometry(cfg.local_crops_size, cfg.local_crops_scale)
        to_tensor = v2.PILToTensor()
        self._clean = v2.Compose([to_tensor, normalise])
        self._global1 = v2.Compose([colour, to_tensor, blur(p1), normalise])
        self._global2 = v2.Compose(
            [
                colour,
                to_tensor,
                blur(p2),
                v2.RandomSolarize(threshold=cfg.solarize_threshold, p=cfg.solarize_p),
                normalise,
            ]
        )
        self._local = v2.Compose([colour, to_tensor, blur(pl), normalise])

    @staticmethod
    def to_pil(image: Any):
        """An RGB PIL image from an HWC uint8 array, a CHW uint8 tensor or a PIL image."""
        from PIL import Image

        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ParameterError(
                    f"tile array must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
                )
            return Image.fromarray(np.ascontiguousarray(image))
        import torch

        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ParameterError(
                    f"tile tensor must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}"
                )
            return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        raise ParameterError(f"a tile must be a PIL image, an array or a tensor, got {type(image)}")

    def __call__(self, image: Any, seed: int | None = None) -> dict[str, list]:
        import torch

        img = self.to_pil(image)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            geometry_1 = self._global_geometry(img)
            global_1 = self._global1(geometry_1)
            geometry_2 = self._global_geometry(img)
            global_2 = self._global2(geometry_2)
            local = [
                self._local(self._local_geometry(img))
                for _ in range(self.config.local_crops_number)
            ]
        crops = {"global_crops": [global_1, global_2], "local_crops": local}
        if self.config.clean_global_crops:
            crops["global_crops_clean"] = [self._clean(geometry_1), self._clean(geometry_2)]
        return crops


class _RandomQuarterTurn:
    """With probability ``p``, turn a (square) PIL crop by 90, 180 or 270 degrees, drawn from
    torch's generator like the torchvision transforms around it."""

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, img: Any) -> Any:
        import torch
        from PIL import Image

        if float(torch.rand(())) >= self.p:
            return img
        turn = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                Image.Transpose.ROTATE_270)[int(torch.randint(3, ()))]
        return img.transpose(turn)


# Ruifrok & Johnston (2001): the optical density (natural log) that a unit of haematoxylin, eosin
# and DAB adds to R, G, B (rows, unit length). OD = concentrations @ RGB_FROM_HED.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def rgb_to_stains(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> ``(..., 3)`` H / E / DAB concentrations (optical density)."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    return od @ HED_FROM_RGB


def stains_to_rgb(stains: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_stains`, rounded and clipped to uint8."""
    rgb = 255.0 * np.exp(-(stains @ RGB_FROM_HED))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class _RandomStainJitter:
    """With probability ``p``, ``stain' = stain * U(1 - scale, 1 + scale) + U(-shift, shift)``,
    drawn per stain from torch's generator, on a PIL crop."""

    def __init__(self, scale: float, shift: float, p: float) -> None:
        self.scale, self.shift, self.p = float(scale), float(shift), float(p)

    def __call__(self, img: Any) -> Any:
        import torch
        from PIL import Image

        if float(torch.rand(())) >= self.p:
            return img
        factor = 1.0 + self.scale * (2.0 * torch.rand(3, dtype=torch.float64).numpy() - 1.0)
        offset = self.shift * (2.0 * torch.rand(3, dtype=torch.float64).numpy() - 1.0)
        stains = rgb_to_stains(np.asarray(img)) * factor + offset
        return Image.fromarray(stains_to_rgb(stains))


def _float32():
    import torch

    return torch.float32
