"""What writing a signed ``.safetensors`` file costs against safetensors' own ``save``.

``safetensors_bytes`` (what ``gpfm-train export`` / ``average`` write) serialises the tensors
twice (once to hash the data section, once with the digest in the header) and then writes the
header again with sorted keys, so that the same weights always give the same bytes. Timed on a
ViT-L/14's state dict (the GPFM network, 304M parameters, 1.2 GB in float32) against one
``safetensors.torch.save`` of the same tensors, in the same run. Prints the machine and a
Markdown table (appended to --out when given)::

    python bench/bench_weights_write.py [--repeats 3] [--out results.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# the bench folder is not a package
from _machine import report  # noqa: E402
from bench_embed import machine_info  # noqa: E402
from bench_weights_checks import median_s  # noqa: E402


def main() -> None:
    import torch
    from safetensors.torch import save

    from napari_gpfm.encoders import get_spec
    from napari_gpfm.encoders.builders import instantiate_on_meta
    from napari_gpfm.encoders.checkpoints import TIMM_METADATA, safetensors_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = ap.parse_args()

    meta = instantiate_on_meta(get_spec("gpfm").builder)
    state = {k: torch.full(v.shape, 0.01, dtype=v.dtype) for k, v in meta.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    write_plain = lambda: save(state, metadata=TIMM_METADATA)  # noqa: E731
    write_signed = lambda: safetensors_bytes(state, TIMM_METADATA)  # noqa: E731
    write_plain(), write_signed()  # one untimed round each: the first allocation is slow
    plain = median_s(write_plain, args.repeats)
    signed = median_s(write_signed, args.repeats)
    report("\n".join([
        str(machine_info(torch.device("cpu"))),
        f"{args.repeats} repeats, median kept",
        "",
        "| weights | size | safetensors save (s) | safetensors_bytes (s) | ratio |",
        "|---|---|---|---|---|",
        f"| ViT-L/14 (gpfm) | {size:.0f} MiB | {plain:.2f} | {signed:.2f} | "
        f"{signed / plain:.2f}x |",
    ]) + "\n", args.out)


if __name__ == "__main__":
    main()
