"""Reading weights files safely, checking them, and fingerprinting them.

Pickle-based files go through ``torch.load(weights_only=True)``, whose restricted unpickler
only rebuilds tensors and plain containers: a file that holds any other Python object is
refused before that object is constructed, so nothing in it runs. ``.safetensors`` files hold
no code at all. The format is sniffed from the bytes, not trusted from the suffix.

A file can also be whole in form and wrong in content: bytes flipped on a disk or in a copy
still parse, and a run that diverged exports NaN weights; both would give features that are
silently garbage. So the ``.safetensors`` files napari-gpfm writes (:func:`safetensors_bytes`:
``gpfm-train export`` and ``average``) carry the sha256 of their tensor data in the header's
metadata, which :func:`read_checkpoint` verifies, and :func:`non_finite_tensors` names the
tensors holding NaN or infinity, which loading refuses whatever the file's origin.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

from napari_gpfm.errors import WeightsError, first_line

_CHUNK = 1 << 20
_ZIP_MAGIC = b"PK\x03\x04"
# Header metadata key of the sha256 of a .safetensors file's data section (what follows the
# header): written by safetensors_bytes, verified by read_checkpoint.
DATA_DIGEST_KEY = "gpfm.data_sha256"
# The header metadata of a timm-layout state dict (export, average, the random twin).
TIMM_METADATA = {"format": "pt", "layout": "timm"}


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sniff_format(path: Path) -> str:
    """``"safetensors"``, ``"torch-zip"`` or ``"pickle"`` from the first bytes of ``path``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < path.stat().st_size:
            return "safetensors"
    return "pickle"


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load a weights file without executing anything in it.

    Returns what the file holds: a state dict, or a dict wrapping one (``{'teacher': ...}``,
    ``{'state_dict': ...}``...). Raises :class:`WeightsError` for a missing, unreadable or
    unsafe file (a pickle that holds anything but tensors and plain containers).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist; check the --weights path")
    if not path.is_file():
        raise WeightsError(f"weights path {path} is not a file; pass the checkpoint file itself")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty; download it again")
    kind = sniff_format(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(DATA_DIGEST_KEY)
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"weights file {path} is a damaged safetensors file ({first_line(exc, 160)}); "
            "download or export it again"
        ) from None
    if expected is not None and data_sha256(path) != expected:
        raise WeightsError(
            f"weights file {path} is damaged: its tensor data differ from what was written "
            f"(the sha256 in its header, {DATA_DIGEST_KEY}, does not match); copy, download or "
            "export it again"
        )
    return state


def _data_offset(header_len_field: bytes) -> int:
    (header_len,) = struct.unpack("<Q", header_len_field)
    return 8 + header_len


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the data section of the .safetensors file ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(_data_offset(handle.read(8)))
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """``tensors`` serialised as .safetensors with ``metadata`` and the sha256 of the data
    section (:data:`DATA_DIGEST_KEY`) in the header, for :func:`read_checkpoint` to verify.

    The data section does not depend on the metadata (tensors are laid out by dtype and name),
    so it is serialised once to be hashed and once more with the digest in its header. The
    header is then written with sorted keys: safetensors keeps the metadata in a hash map whose
    order changes from call to call, and the same tensors must give the same file (its sha256
    is the encoder's identity in stores and libraries).
    """
    from safetensors.torch import save

    plain = save(tensors, metadata=metadata)
    digest = hashlib.sha256(memoryview(plain)[_data_offset(plain[:8]):]).hexdigest()
    del plain  # a ViT-L is 1.2 GB: one copy at a time
    signed = save(tensors, metadata={**metadata, DATA_DIGEST_KEY: digest})
    start = _data_offset(signed[:8])
    if hashlib.sha256(memoryview(signed)[start:]).hexdigest() != digest:
        raise RuntimeError("safetensors laid the same tensors out twice differently")
    header = json.dumps(json.loads(signed[8:start]), sort_keys=True,
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(header)) + header + memoryview(signed)[start:]


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold NaN or infinity."""
    import torch

    def finite(tensor: torch.Tensor) -> bool:
        # NaN or infinity anywhere makes the sum NaN or infinite, so a finite sum proves the
        # tensor finite without a full-size mask (11x faster on a ViT-L, docs/benchmarks.md);
        # a non-finite sum, which huge finite values can also give, is settled element by
        # element.
        return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())

    return [
        name for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not finite(value)
    ]


def _read_torch(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "weights only" in message.lower() or "weights_only" in message:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(
                f"refused to load {path}: it holds Python objects{what}, not just tensors, "
                "and unpickling them could run code; save a plain state dict "
                "(torch.save(model.state_dict())) or a .safetensors file instead"
            ) from None
        raise WeightsError(
            f"weights file {path} is not a PyTorch or safetensors checkpoint ({first_line(exc, 160)})"
        ) from None
    except Exception as exc:  # the restricted unpickler fails in many ways on foreign bytes
        raise WeightsError(
            f"weights file {path} is not a readable PyTorch or safetensors checkpoint "
            f"({first_line(exc, 160)}); download it again"
        ) from None


