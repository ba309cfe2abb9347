"""The embedding engine: tiles of a slide -> encoder -> embedding store, resumable.

Pipeline per batch::

    TileLoader threads (read + decode, prefetching) -> uint8 batch
      -> pinned host buffer -> non-blocking copy to the device (CUDA)
      -> encoder.preprocess_on_device (resize + normalise on the device)
      -> forward under inference mode (bf16 autocast on CUDA, fp32 on CPU)
      -> pooled features -> non-blocking copy back -> writer thread -> store.write

On CUDA nothing on the main thread waits for the GPU: the copy back is recorded with an event
and a single writer thread waits on it, so reading, computing and writing overlap. A batch that
runs out of GPU memory is split in halves (and later batches stay at the smaller size).

``iter_embed`` is a generator for GUIs (one :class:`EmbedProgress` per batch written; close it
or set ``cancel_event`` to stop); ``embed_slide`` runs it to the end and returns the result.
Rows already done in the store are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_gpfm.embedding.store import POOLINGS, EmbeddingStore, encoder_metadata
from napari_gpfm.errors import ParameterError, StoreError, WeightsError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Batches handed to the writer but not yet on disk; bounds host memory and GPU run-ahead.
MAX_WRITES_IN_FLIGHT = 3


@dataclass(frozen=True)
class EmbedProgress:
    """One batch written: ``done`` of ``total`` rows are now on disk."""

    done: int
    total: int
    batch_indices: np.ndarray
    batch_features: np.ndarray
    computed: int
    elapsed_s: float

    @property
    def tiles_per_s(self) -> float:
        """Tiles computed in this run per second so far."""
        return self.computed / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class EmbedResult:
    """What a run did. ``computed`` counts tiles embedded by this run (skipped ones excluded)."""

    store_path: Path
    total: int
    done: int
    computed: int
    skipped: int
    complete: bool
    cancelled: bool
    seconds: float
    device: str
    precision: str
    batch_size: int
    micro_batch: int
    oom_splits: int = 0
    compiled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def tiles_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------- device
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; an explicit device must exist (ParameterError).

    The messages name the value, not a flag: the CLI's ``--device`` and the viewer's Device
    field both show them.
    """
    name = str(device).strip().lower() if not isinstance(device, torch.device) else device.type
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(
            f"device {device!r} is not a device; use one of {', '.join(DEVICES)} or cuda:N"
        ) from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(
                f"device {device}: no CUDA GPU is available here; use cpu or auto"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ParameterError(
                f"device {device}: only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif target.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ParameterError(f"device {device}: MPS is not available; use cpu")
    elif target.type != "cpu":
        raise ParameterError(f"device {device} is not supported; use one of {DEVICES}")
    return target


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if precision not in PRECISIONS:
        raise ParameterError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None  # CPU bf16 matmuls are slower than fp32 on most CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ParameterError("precision='fp16' needs a GPU; use fp32 or bf16 on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---------------------------------------------------------------------------- store helpers
def patch_token_shape(encoder: Any) -> tuple[int, int, int]:
    """``(h, w, d)`` of the encoder's patch-token grid for its input size."""
    spec = encoder.spec
    grid = getattr(spec, "patch_grid", None)
    dim = getattr(spec, "token_dim", None) or getattr(encoder, "token_dim", None)
    if not grid or not dim:
        raise ParameterError(f"encoder {spec.name!r} has no patch tokens to store")
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return int(h), int(w), int(dim)


def check_store_dtype(store: EmbeddingStore, dtype: str | None) -> None:
    """Refuse to resume a store in another feature precision than ``dtype`` (None: any):
    the new rows would be cast to the store's silently."""
    stored = store.attrs.get("dtype")
    if dtype is not None and stored != dtype:
        raise StoreError(
            f"{store.path} stores {stored} features, --dtype {dtype} was asked; use --overwrite "
            "to recompute it, or drop --dtype to keep it"
        )


def prepare_store(
    path: str | Path,
    *,
    slide: Any,
    grid: Any,
    encoder: Any,
    spec: Any = None,
    pooling: str = "cls",
    dtype: str | None = None,
    patch_tokens: bool = False,
    overwrite: bool = False,
) -> EmbeddingStore:
    """Open the store at ``path`` to resume it, or create it.

    An existing store must have the same identity (slide content, encoder + weights, tiling,
    pooling), keep patch tokens if they are asked for and hold ``dtype`` features if one is
    asked for; otherwise :class:`StoreError` says what differs. ``overwrite`` replaces it
    instead. A new store holds ``dtype`` (default float16) features.
    """
    spec = spec if spec is not None else grid.spec
    meta = encoder_metadata(encoder)
    path = Path(path)
    if path.exists() and not overwrite:
        expected = EmbeddingStore.identity_of(
            slide=slide, encoder_meta=meta, spec=spec, pooling=pooling
        )
        store = EmbeddingStore.open(path, expected, mode="r+")
        check_store_dtype(store, dtype)
        if patch_tokens and not store.has_patch_tokens:
            raise StoreError(
                f"{path} was made without patch tokens; use --overwrite to recompute it with "
                "them, or another --out folder"
            )
        if store.n_tiles != len(grid.coords) or not np.array_equal(
            store.all_coords, np.asarray(grid.coords, np.int64)
        ):
            raise StoreError(
                f"{path} holds another tile grid ({store.n_tiles} tiles, {len(grid.coords)} "
                "now) for the same tiling settings; use --overwrite to recompute it"
            )
        return store
    return EmbeddingStore.create(
        path,
        slide=slide,
        grid=grid,
        encoder_meta=meta,
        dtype=dtype or "float16",
        patch_tokens_shape=patch_token_shape(encoder) if patch_tokens else None,
        pooling=pooling,
        spec=spec,
        overwrite=overwrite,
    )


def pending_runs(done: np.ndarray, limit: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` runs of rows not done, in order, at most ``limit`` rows."""
    todo = np.flatnonzero(~np.asarray(done, bool))
    if limit is not None:
        todo = todo[: max(0, int(limit))]
    if todo.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(todo) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [todo.size]])
    return [(int(todo[a]), int(todo[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


# ---------------------------------------------------------------------------- forward
class BatchForward:
    """Preprocess + forward + pool one batch on the device, halving it when memory runs out.

    ``forward(uint8 images (B, H, W, 3) on any device) -> (features (B, D) float32,
    patch tokens or None)``, both on the device. The engine's compute step, also used as is
    by the benchmarks so that "model-only" measures exactly what the engine runs.
    """

    def __init__(
        self,
        encoder: Any,
        device: torch.device,
        autocast: torch.dtype | None,
        pooling: str,
        patch_tokens: bool,
        micro_batch: int,
        compile_model: bool | str,
    ):
        self.encoder = encoder
        self.device = device
        self.autocast = autocast
        self.pooling = pooling
        self.want_tokens = patch_tokens or pooling != "cls"
        self.keep_tokens = patch_tokens
        self.micro_batch = max(1, int(micro_batch))
        self.oom_splits = 0
        self.compiled = False
        self._call: Callable[[torch.Tensor], dict[str, torch.Tensor]] = self._plain
        if compile_model:
            backend = compile_model if isinstance(compile_model, str) else "inductor"
            self._call = torch.compile(self._plain, dynamic=False, backend=backend)
            self.compiled = True

    def _plain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encoder(x, patch_tokens=self.want_tokens)

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = images.shape[0]
        pad = 0
        if self.compiled and n < self.micro_batch:
            # A compiled graph is specialised to its batch size: pad instead of recompiling.
            pad = self.micro_batch - n
            images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])], 0)
        x = self.encoder.preprocess_on_device(images)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast or torch.float32,
            enabled=self.autocast is not None,
        ):
            out = self._call(x)
        cls = out["cls"]
        tokens = out.get("patch_tokens")
        if self.pooling == "cls":
            feats = cls
        elif self.pooling == "mean":
            feats = tokens.float().mean(dim=(1, 2))
        else:
            feats = torch.cat([cls.float(), tokens.float().mean(dim=(1, 2))], dim=1)
        feats = feats.float()
        if pad:
            feats = feats[:n]
            tokens = tokens[:n] if tokens is not None else None
        if not self.keep_tokens:
            tokens = None
        return feats, tokens

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats: list[torch.Tensor] = []
        toks: list[torch.Tensor] = []
        start = 0
        n = images.shape[0]
        while start < n:
            size = min(self.micro_batch, n - start)
            try:
                with torch.inference_mode():
                    f, t = self._run(images[start : start + size])
            except torch.OutOfMemoryError:
                if size <= 1:
                    raise ParameterError(
                        f"out of {self.device.type} memory even for one tile with encoder "
                        f"{self.encoder.spec.name!r}; free the GPU or use --device cpu"
                    ) from None
                self.micro_batch = max(1, size // 2)
                self.oom_splits += 1
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of memory at %d tiles per forward; retrying with %d",
                            size, self.micro_batch)
                continue
            feats.append(f)
            if t is not None:
                toks.append(t)
            start += size
        feat = feats[0] if len(feats) == 1 else torch.cat(feats)
        tok = (toks[0] if len(toks) == 1 else torch.cat(toks)) if toks else None
        return feat, tok


class _PinnedRing:
    """A few page-locked host buffers reused for host->device copies of uint8 batches.

    ``cudaHostAlloc`` per batch costs as much as the copy it speeds up; a buffer is reused
    only after the event recorded behind its copy has completed.
    """

    def __init__(self, slots: int = 3):
        self._slots: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._n = slots
        self._next = 0

    def to_device(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        src = torch.from_numpy(np.ascontiguousarray(array))
        if len(self._slots) < self._n:
            self._slots.append((torch.empty(0, dtype=torch.uint8).pin_memory(), None))
        i = self._next
        self._next = (self._next + 1) % self._n
        buf, event = self._slots[i]
        if event is not None:
            event.synchronize()
        if buf.numel() < src.numel():
            buf = torch.empty(src.numel(), dtype=torch.uint8).pin_memory()
        host = buf[: src.numel()].view(src.shape)
        host.copy_(src)
        out = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._slots[i] = (buf, event)
        return out


@dataclass
class _PendingWrite:
    indices: np.ndarray
    future: Future


def _write_batch(
    store: EmbeddingStore,
    indices: np.ndarray,
    feats: torch.Tensor,
    tokens: torch.Tensor | None,
    event: Any,
) -> np.ndarray:
    if event is not None:
        event.synchronize()
    features = feats.numpy()
    if not np.isfinite(features).all():
        bad = indices[~np.isfinite(features).all(axis=1)]
        raise WeightsError(
            f"the encoder produced NaN/inf features for tiles {bad[:5].tolist()}; its weights "
            "are damaged or do not belong to this architecture"
        )
    store.write(indices, features, None if tokens is None else tokens.numpy())
    return features


# ---------------------------------------------------------------------------- the run
def _make_loader(slide: Any, grid: Any, batch_size: int, num_workers: int, start: int,
                 stop: int) -> Any:
    from napari_gpfm.tiling import TileLoader

    return TileLoader(slide, grid, batch_size=batch_size, num_workers=num_workers,
                      start=start, stop=stop)


def iter_embed(
    slide: Any,
    grid: Any,
    encoder: Any,
    store: EmbeddingStore,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int = 2,
    patch_tokens: bool = False,
    pooling: str | None = None,
    precision: str = "auto",
    compile: bool | str = False,
    limit: int | None = None,
    cancel_event: threading.Event | None = None,
) -> Generator[EmbedProgress, None, EmbedResult]:
    """Embed the rows of ``store`` that are not done; yield after each batch is on disk.

    Returns (as the generator's return value) an :class:`EmbedResult`. Closing the generator
    or setting ``cancel_event`` stops after the batches already computed are written; the
    store then resumes from there on the next call. ``limit`` caps the tiles computed by this
    call. ``compile`` runs the encoder through ``torch.compile`` (True: inductor; a string
    names another backend); the last, smaller batch is padded so that one graph serves the
    whole run. ``pooling`` defaults to the store's (``cls``: the encoder's image embedding;
    ``mean``: mean patch token; ``cls+mean``: both concatenated).
    """
    if batch_size < 1:
        raise ParameterError(f"--batch-size {batch_size} must be at least 1")
    if num_workers < 0:
        raise ParameterError(f"--workers {num_workers} must be 0 or more")
    if limit is not None and limit < 0:
        raise ParameterError(f"--limit {limit} must be 0 or more")
    store_pooling = str(store.attrs.get("pooling", "cls"))
    pooling = pooling or store_pooling
    if pooling not in POOLINGS:
        raise ParameterError(f"pooling={pooling!r}: use one of {', '.join(POOLINGS)}")
    if pooling != store_pooling:
        raise StoreError(
            f"{store.path} holds {store_pooling!r} features, not {pooling!r}; use another store"
        )
    _check_fits(store, grid, encoder)
    target = resolve_device(device)
    autocast = resolve_precision(precision, target)
    if getattr(encoder, "device", target) != target:
        encoder.to(target)
    keep_tokens = patch_tokens or store.has_patch_tokens
    if keep_tokens and not store.has_patch_tokens:
        raise StoreError(f"{store.path} has no patch_tokens array; recreate it with patch tokens")

    forward = BatchForward(encoder, target, autocast, pooling, keep_tokens, batch_size, compile)
    total = store.n_tiles
    done_mask = store.done
    runs = pending_runs(done_mask, limit)
    skipped = int(done_mask.sum())
    done = skipped
    computed = 0
    cancelled = failed = False
    t0 = time.perf_counter()
    cuda = target.type == "cuda"
    ring = _PinnedRing() if cuda else None
    inflight: collections.deque[_PendingWrite] = collections.deque()
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpfm-store-writer")
    loader = None

    def finish(pending: _PendingWrite) -> EmbedProgress:
        nonlocal done, computed
        feats = pending.future.result()
        done += pending.indices.size
        computed += pending.indices.size
        return EmbedProgress(done, total, pending.indices, feats, computed,
                             time.perf_counter() - t0)

    with store.writer_lock():
        try:
            for start, stop in runs:
                loader = _make_loader(slide, grid, batch_size, num_workers, start, stop)
                with loader:
                    for batch in loader:
                        if cancel_event is not None and cancel_event.is_set():
                            cancelled = True
                            break
                        indices = np.asarray(batch.indices, np.int64)
                        if cuda:
                            images = ring.to_device(batch.images, target)
                        else:
                            images = torch.from_numpy(np.ascontiguousarray(batch.images))
                        feats, tokens = forward(images)
                        event = None
                        if cuda:
                            feats = feats.to("cpu", non_blocking=True)
                            tokens = tokens.to("cpu", non_blocking=True) if tokens is not None \
                                else None
                            event = torch.cuda.Event()
                            event.record()
                        elif tokens is not None:
                            tokens = tokens.float()
                        future = writer.submit(_write_batch, store, indices, feats, tokens,
                                               event)
                        inflight.append(_PendingWrite(indices, future))
                        while inflight and (
                            len(inflight) >= MAX_WRITES_IN_FLIGHT or inflight[0].future.done()
                        ):
                            yield finish(inflight.popleft())
                loader = None
                if cancelled:
                    break
            while inflight:
                yield finish(inflight.popleft())
        except GeneratorExit:
            cancelled = True
            failed = True  # closing the generator: nothing more may be raised or yielded
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if loader is not None:
                with contextlib.suppress(Exception):
                    loader.cancel()
            # Batches already computed are valid: let them reach the disk before closing.
            errors = []
            for pending in inflight:
                try:
                    pending.future.result()
                    done += pending.indices.size
                    computed += pending.indices.size
                except Exception as exc:  # the first one is raised below
                    errors.append(exc)
            inflight.clear()
            writer.shutdown(wait=True)
            complete = store.finalize()
            if errors and not failed:
                raise errors[0]
    seconds = time.perf_counter() - t0
    return EmbedResult(
        store_path=Path(store.path),
        total=total,
        done=done,
        computed=computed,
        skipped=skipped,
        complete=complete,
        cancelled=cancelled,
        seconds=seconds,
        device=str(target),
        precision=_precision_name(autocast),
        batch_size=batch_size,
        micro_batch=forward.micro_batch,
        oom_splits=forward.oom_splits,
        compiled=forward.compiled,
    )


def _check_fits(store: EmbeddingStore, grid: Any, encoder: Any) -> None:
    meta = encoder_metadata(encoder)
    mine = store.identity
    if meta["encoder_id"] != mine["encoder_id"] or meta["weights_sha256"] != mine[
        "weights_sha256"
    ]:
        raise StoreError(
            f"{store.path} was made with encoder {mine['encoder_id']}, not {meta['encoder_id']}; "
            "use --overwrite or another --out folder"
        )
    if store.n_tiles != len(grid.coords):
        raise StoreError(
            f"{store.path} has {store.n_tiles} tiles but the grid has {len(grid.coords)}; "
            "it was made for another tiling"
        )
    model_size = int(store.attrs.get("model_size", encoder.spec.input_size))
    if model_size != int(encoder.spec.input_size):
        raise ParameterError(
            f"the tiling resizes tiles to {model_size} px but encoder {encoder.spec.name!r} "
            f"takes {encoder.spec.input_size} px inputs; use --size {encoder.spec.input_size}"
        )


def embed_slide(
    slide: Any,
    grid: Any,
    encoder: Any,
    store: EmbeddingStore,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int = 2,
    patch_tokens: bool = False,
    pooling: str | None = None,
    precision: str = "auto",
    compile: bool | str = False,
    limit: int | None = None,
    progress: Callable[[EmbedProgress], None] | None = None,
    cancel_event: threading.Event | None = None,
) -> EmbedResult:
    """Embed every tile of ``grid`` not yet done in ``store``; see :func:`iter_embed`.

    ``progress`` is called after each batch reaches the disk.
    """
    gen = iter_embed(
        slide, grid, encoder, store, device=device, batch_size=batch_size,
        num_workers=num_workers, patch_tokens=patch_tokens, pooling=pooling,
        precision=precision, compile=compile, limit=limit, cancel_event=cancel_event,
    )
    while True:
        try:
            update = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(update)


def eta_seconds(done: int, total: int, rate: float) -> float:
    """Seconds left at ``rate`` tiles/s (inf when nothing is known yet)."""
    if rate <= 0:
        return math.inf
    return max(0.0, (total - done) / rate)
