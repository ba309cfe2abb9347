"""``gpfm-train average``: one encoder whose weights are the mean of several exported teachers.

Stochastic weight averaging (Izmailov et al., 2018) across training stages: each stage of a
run restarted from the previous stage's teacher (warm-up, cosine learning rate, teacher
momentum 0.992 -> 1) ends at a different point of the same basin, and the mean of those end
points is usually a flatter, better-generalising solution than any one of them. The embedded
default model is such an average (docs/default-model.md).

Inputs are timm-layout exports of ``gpfm-train export`` (``.safetensors`` + ``.json``) of the
same network; the output is one more export of that network, loadable as the ``default``
encoder. The mean is taken in float64 and stored in each tensor's own dtype.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from napari_gpfm.errors import ParameterError, WeightsError

# Fields of the description that must agree: the network and what it expects as input.
_SAME_NETWORK = ("architecture", "model_kwargs", "embed_dim", "input_size", "mean", "std",
                 "interpolation", "native_mpp", "native_read_size", "patch_size", "token_dim")


def average_exports(sources: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the uniform average of the exported teachers ``sources`` to ``out``
    (``.safetensors``; its ``.json`` description beside it) and return ``out``."""
    import torch

    from napari_gpfm.analysis._io import atomic_output
    from napari_gpfm.encoders.checkpoints import (
        TIMM_METADATA,
        non_finite_tensors,
        read_checkpoint,
        safetensors_bytes,
    )
    from napari_gpfm.encoders.default_model import DefaultModelConfig
    from napari_gpfm.encoders.layouts import abridge

    paths = [Path(p).expanduser() for p in sources]
    if len(paths) < 2:
        raise ParameterError("gpfm-train average needs at least two exported teachers")
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ParameterError(f"--out {out}: the average is written as .safetensors")
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise ParameterError(f"{path} is given twice: it would weigh double in the mean; "
                                 "name each teacher once")
        seen.add(path.resolve())
    if out.resolve() in seen:
        raise ParameterError(f"--out {out} is one of the inputs; write the average elsewhere")
    descriptions = []
    for path in paths:
        if not path.is_file():
            raise ParameterError(f"{path}: no such file (an exported teacher to average)")
        if path.suffix != ".safetensors":
            raise ParameterError(
                f"{path}: not an exported teacher (.safetensors); make one with "
                "`gpfm-train export CKPT --out FILE.safetensors`"
            )
        if not path.with_suffix(".json").is_file():
            raise WeightsError(f"{path}: its description {path.with_suffix('.json')} is missing; "
                               "export the checkpoint again")
        descriptions.append(DefaultModelConfig.read(path.with_suffix(".json")))
    first = descriptions[0]
    for path, description in zip(paths[1:], descriptions[1:], strict=True):
        differ = [f for f in _SAME_NETWORK if getattr(description, f) != getattr(first, f)]
        if differ:
            raise WeightsError(f"{path} is another network than {paths[0]} "
                               f"({', '.join(differ)} differ); only one network's weights average")

    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        state = read_checkpoint(path)  # a damaged file is a one-line WeightsError
        if total and (set(state) != set(total) or any(
                state[k].shape != total[k].shape for k in total)):
            raise WeightsError(f"{path}: its tensors differ from {paths[0]}'s in names or shapes")
        broken = non_finite_tensors(state)
        if broken:
            raise WeightsError(f"{path} holds NaN or infinite values ({abridge(broken)}); it "
                               "would spoil the mean: leave it out")
        for key, tensor in state.items():
            dtypes.setdefault(key, tensor.dtype)
            total[key] = total.get(key, 0) + tensor.to(torch.float64)
    mean = {k: (v / len(paths)).to(dtypes[k]).contiguous() for k, v in total.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, "averaged weights") as tmp:
        tmp.write_bytes(safetensors_bytes(mean, TIMM_METADATA))
    names = ", ".join(str(p) for p in paths)
    notes = f"uniform average of {len(paths)} exported teachers ({names})"
    dataclasses.replace(first, notes=notes).write(out.with_suffix(".json"))
    return out


__all__ = ["average_exports"]
