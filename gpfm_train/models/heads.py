"""Projection heads: the DINO/iBOT prototype head and the per-expert distillation heads.

Both follow DINOv2's ``DINOHead``: an MLP to a bottleneck, L2 normalisation, then a
weight-normalised linear layer without bias whose magnitude ``g`` starts at 1 and is trained
(DINOv2 does not freeze it, unlike DINO v1's ``norm_last_layer``).

Weight norm uses the parametrisation API, so the state-dict keys of the last layer are
``last_layer.parametrizations.weight.original0`` (``g``, shape ``(out, 1)``) and ``...original1``
(``v``). DINOv2 checkpoints call them ``last_layer.weight_g`` / ``last_layer.weight_v``; torch's
weight-norm load hook accepts those names, and :func:`to_legacy_weight_norm_keys` /
:func:`from_legacy_weight_norm_keys` convert explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

_NEW_G = ".parametrizations.weight.original0"
_NEW_V = ".parametrizations.weight.original1"
_OLD_G = ".weight_g"
_OLD_V = ".weight_v"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, bias: bool
) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normed Linear(bottleneck -> out_dim, no bias).

    ``nlayers=3``: Linear(in, hidden)-GELU-Linear(hidden, hidden)-GELU-Linear(hidden, bottleneck).
    ``nlayers=1``: a single Linear(in, bottleneck). The MLP gets trunc_normal(0.02) weights and
    zero biases; the last layer keeps torch's default Linear init for its direction ``v`` (as in
    DINOv2, whose init runs before the last layer exists) and ``g = 1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers={nlayers} must be at least 1")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, mlp_bias)
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # 1e-12 underflows to 0 in fp16, which would turn a zero vector into NaN.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


class ExpertHead(DINOHead):
    """GPFM's per-expert head (note section 3.2): Linear(in -> bottleneck) -> L2 normalise ->
    weight-normed Linear(bottleneck -> expert dim). Applied to the student's CLS token and to its
    patch tokens alike (one head per expert)."""

    def __init__(self, in_dim: int, out_dim: int, bottleneck_dim: int = 256) -> None:
        super().__init__(
            in_dim, out_dim, hidden_dim=bottleneck_dim, bottleneck_dim=bottleneck_dim, nlayers=1
        )


def to_legacy_weight_norm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``X.parametrizations.weight.original0/1`` to DINOv2's ``X.weight_g/weight_v``."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_NEW_G):
            key = key[: -len(_NEW_G)] + _OLD_G
        elif key.endswith(_NEW_V):
            key = key[: -len(_NEW_V)] + _OLD_V
        out[key] = value
    return out


def from_legacy_weight_norm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_legacy_weight_norm_keys`."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_OLD_G):
            key = key[: -len(_OLD_G)] + _NEW_G
        elif key.endswith(_OLD_V):
            key = key[: -len(_OLD_V)] + _NEW_V
        out[key] = value
    return out
