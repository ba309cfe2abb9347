"""KoLeo regulariser (DINOv2 ``KoLeoLoss``): spreads the batch's CLS tokens apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows, always in fp32.

    ``x_nn(i)`` is the row with the largest dot product with ``x_i`` other than itself. Computed
    per rank on the local batch (no gather), as in DINOv2.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-1.0)
                neighbour = dots.argmax(dim=1)
            distances = F.pairwise_distance(x, x[neighbour], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
