"""What the content checks cost when an encoder loads: the tensor-data digest that
napari-gpfm's ``.safetensors`` files carry (verified by ``read_checkpoint``) and the NaN / inf
scan, against the whole ``load_encoder``, and the identity hash of the whole file that
``load_encoder`` runs in a thread beside them (each part timed alone, then the whole).

Measured on a ViT-L/14 (the GPFM network, 304M parameters, 1.2 GB in float32, written by
``safetensors_bytes`` as ``gpfm-train export`` writes) and on the embedded default model
(2.7M parameters, 11 MB), both from the page cache (a second load, as when the same model is
loaded again; a cold read adds the disk's time). Prints the machine and a Markdown table::

    python bench/bench_weights_checks.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_embed import machine_info  # noqa: E402  (the bench folder is not a package)


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from napari_gpfm.encoders import get_spec, load_encoder
    from napari_gpfm.encoders.builders import instantiate_on_meta
    from napari_gpfm.encoders.checkpoints import (
        data_sha256,
        non_finite_tensors,
        safetensors_bytes,
        weights_sha256,
    )
    from napari_gpfm.encoders.default_model import default_files

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print(machine_info(torch.device("cpu")))
    print(f"{args.repeats} repeats, median kept, files in the page cache\n")
    print("| weights | size | load_encoder (s) | identity hash alone (s) | digest check alone "
          "(s) | NaN/inf scan alone (s) | checks / load_encoder |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        vitl = Path(tmp) / "vitl14.safetensors"
        meta = instantiate_on_meta(get_spec("gpfm").builder)
        state = {k: torch.full(v.shape, 0.01, dtype=v.dtype) for k, v in meta.state_dict().items()}
        vitl.write_bytes(safetensors_bytes(state, {"format": "pt"}))
        del state, meta
        _, default = default_files()
        for name, model, path in (("ViT-L/14 (gpfm)", "gpfm", vitl),
                                  ("embedded default", "default", default)):
            load_encoder(model, weights=path)  # warm: page cache, imports
            total = median_s(lambda m=model, p=path: load_encoder(m, weights=p), args.repeats)
            identity = median_s(lambda p=path: weights_sha256(p), args.repeats)
            digest = median_s(lambda p=path: data_sha256(p), args.repeats)
            tensors = load_file(str(path))
            scan = median_s(lambda s=tensors: non_finite_tensors(s), args.repeats)
            del tensors
            size = path.stat().st_size / 2**20
            print(f"| {name} | {size:.0f} MiB | {total:.2f} | {identity:.3f} | {digest:.3f} | "
                  f"{scan:.3f} | {(digest + scan) / total:.0%} |")


if __name__ == "__main__":
    main()
