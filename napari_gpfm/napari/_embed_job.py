"""The embedding job the Embed widget runs in a worker thread (Qt-free).

It is the same sequence of core calls as ``gpfm embed`` for one slide: load the encoder, lay
the tile grid, open (resume) or create the store, then run :func:`iter_embed`. It yields a
:class:`JobStage` while preparing, one :class:`JobStarted` once the store is known, then the
engine's ``EmbedProgress`` after every batch on disk; it returns the engine's ``EmbedResult``.
Nothing here touches napari: the widget turns the yielded values into layers on the main thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.errors import ParameterError


@dataclass(frozen=True)
class EmbedRequest:
    """Everything the user chose in the Embed widget."""

    slide_path: Path
    model: str
    weights: Path | None
    slide_mpp: float | None  # level-0 um/px the user gave a slide that records none
    mpp: float
    read_size: int
    min_tissue: float
    device: str
    out_dir: Path
    batch_size: int = 32
    num_workers: int = 2


@dataclass(frozen=True)
class JobStage:
    """A preparation step, for the status line."""

    message: str


@dataclass(frozen=True)
class JobStarted:
    """The store is open: ``done`` says which of the grid's ``coords`` are already embedded."""

    store_path: Path
    coords: np.ndarray
    done: np.ndarray
    tile_size_l0: float
    stride_l0: float
    slide_dims: tuple[int, int]
    encoder_id: str
    encoder_name: str
    tiling_id: str
    device: str


def viewer_cpu_threads() -> int:
    """Compute threads for CPU embedding inside the viewer: every core but one.

    The spare core keeps napari's event loop responsive; torch's default (all cores) starves
    it, and on a busy machine the extra, over-subscribed thread also made embedding slower
    (see docs/user-guide.md, "Responsiveness").
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embed_job(
    request: EmbedRequest, cancel_event: threading.Event | None = None
) -> Generator[JobStage | JobStarted | Any, None, Any]:
    """Prepare and run one slide's embedding; see the module docstring for what it yields."""
    from napari_gpfm.napari._llvm_guard import keep_triton_out

    keep_triton_out()  # before torch's lazy imports can pull Triton into the viewer process
    from napari_gpfm.embedding import default_store_path
    from napari_gpfm.embedding.engine import iter_embed, prepare_store, resolve_device
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.napari._reader import _open_cached
    from napari_gpfm.tiling import TilingSpec, make_grid

    device = resolve_device(request.device)
    yield JobStage(f"Loading encoder {request.model} on {device.type}…")
    encoder = load_encoder(request.model, weights=request.weights, device=device)
    spec = TilingSpec(
        mpp=request.mpp,
        read_size=request.read_size,
        model_size=int(encoder.spec.input_size),
        min_tissue=request.min_tissue,
    )
    slide = _open_cached(request.slide_path, request.slide_mpp)
    yield JobStage("Finding tissue tiles…")
    grid = make_grid(slide, spec)
    if len(grid) == 0:  # refused before a store exists, so no panel switches to an empty one
        raise ParameterError(
            f"{slide.name}: no tile has enough tissue at Min. tissue {spec.min_tissue:g}; "
            "lower Min. tissue" if grid.candidates else
            f"{slide.name}: one tile ({grid.tile_size_l0:.0f} slide pixels) is larger than the "
            "slide; choose a smaller Tile size or a coarser Resolution"
        )
    store_path = default_store_path(request.out_dir, slide, encoder.spec.name, spec)
    store = prepare_store(store_path, slide=slide, grid=grid, encoder=encoder, spec=spec)
    yield JobStarted(
        store_path=Path(store_path),
        coords=store.all_coords,
        done=store.done,
        tile_size_l0=float(grid.tile_size_l0),
        stride_l0=float(grid.stride_l0),
        slide_dims=(int(slide.dimensions[0]), int(slide.dimensions[1])),
        encoder_id=str(encoder.encoder_id),
        encoder_name=str(encoder.spec.name),
        tiling_id=str(spec.id),
        device=str(device),
    )
    threads = _torch_threads(viewer_cpu_threads()) if device.type == "cpu" else (
        contextlib.nullcontext()
    )
    with threads:
        result = yield from iter_embed(
            slide,
            grid,
            encoder,
            store,
            device=device,
            batch_size=request.batch_size,
            num_workers=request.num_workers,
            cancel_event=cancel_event,
        )
    return result
