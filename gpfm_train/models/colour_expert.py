"""A parameter-free frozen expert: the joint RGB colour histogram of each global crop.

Self-distillation with colour jitter and grayscale teaches the student to ignore stain colour:
two views of a tile that differ in hue must give the same prototypes. That is what makes an
encoder robust across labs, but it also throws away colour that separates tissue within one
slide (keratin and collagen share a texture scale and differ mostly in eosin shade). GPFM's
answer to "self-distillation misses something" is expert distillation; this expert supplies the
missing thing at no cost: the student's CLS, through its own expert head, must predict the colour
distribution of the crop it sees (``1 - cos``, like any CLS expert), while DINO/iBOT keep
pulling towards colour-robust structure. With ``clean_input: true`` (and
``data.crops.clean_global_crops: true``) the target is the histogram of the same crop before
colour jitter, grayscale, blur and solarisation: the tile's own colour, which every view of the
tile shares, so the expert no longer asks the CLS to follow the jitter DINO teaches it to ignore.

With ``histogram_scale: log`` the target is ``log1p`` of the densities. Under ``1 - cos`` the
largest bins decide the target: a tile of a few keratin flakes on glass has nearly the target of
clean glass, although the linear probe reads the flakes' rare colour bins well. The log scale
compresses the dominant bins, so a colour that covers a few percent of a crop moves the target.

The feature is exactly ``napari_gpfm``'s evaluation baseline ``baseline:colour-histogram``
(:class:`napari_gpfm.evaluation.features.ColourHistogram`): ``bins`` bins per channel over 8-bit
values, L1-normalised and multiplied by ``bins**3``. The expert expects RGB in ``[0, 1]``;
:meth:`gpfm_train.module.ExpertSource.expert_config` asks the distiller to undo the ImageNet
normalisation for it (``input_mean`` 0, ``input_std`` 1).
"""

from __future__ import annotations

import torch
from torch import nn

from napari_gpfm.errors import ConfigError
from napari_gpfm.evaluation.features import ColourHistogram

__all__ = ["HISTOGRAM_SCALES", "ColourHistogramExpert", "check_histogram_scale"]

HISTOGRAM_SCALES = ("linear", "log")


def check_histogram_scale(scale: str) -> str:
    """``scale`` if it is one of :data:`HISTOGRAM_SCALES`, else a one-line ConfigError."""
    if scale not in HISTOGRAM_SCALES:
        raise ConfigError(f"histogram_scale={scale!r}: choose one of {', '.join(HISTOGRAM_SCALES)}")
    return scale


class ColourHistogramExpert(nn.Module):
    """``(B, 3, H, W)`` RGB in ``[0, 1]`` -> ``{"cls": (B, bins**3)}`` colour densities
    (``scale="log"``: their ``log1p``)."""

    def __init__(self, bins: int = 8, scale: str = "linear") -> None:
        super().__init__()
        self.bins = ColourHistogram(bins).bins  # validates: bins must divide 256
        self.embed_dim = self.bins**3
        self.scale = check_histogram_scale(scale)

    def forward(self, x: torch.Tensor, patch_tokens: bool = False) -> dict[str, torch.Tensor]:
        if patch_tokens:
            raise ConfigError(
                "the colour-histogram expert has no patch tokens; leave its patch_weight unset"
            )
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB crops (B, 3, H, W), got {tuple(x.shape)}")
        batch = x.shape[0]
        # Back to the 8-bit values the baseline bins (rounding undoes the float round trip).
        values = (x.float().clamp(0.0, 1.0) * 255.0).round().to(torch.int64)
        q = values // (256 // self.bins)
        code = (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]
        offsets = torch.arange(batch, device=x.device, dtype=torch.int64) * self.embed_dim
        code = code.reshape(batch, -1) + offsets[:, None]
        counts = torch.bincount(code.reshape(-1), minlength=batch * self.embed_dim)
        counts = counts.reshape(batch, self.embed_dim).float()
        density = counts * (self.embed_dim / counts.sum(dim=1, keepdim=True))
        return {"cls": torch.log1p(density) if self.scale == "log" else density}
