"""The embedding store: one zarr v3 group per (slide, encoder + weights, tiling), resumable.

Layout (see ``docs/architecture.md``, "Embedding store")::

    <slide stem>/<encoder>-<tiling id>.zarr/
        zarr.json            group attributes: identity, encoder, preprocessing, tiling, slide
        features/            (N, D) float16 (or float32), chunks of ROW_CHUNK rows
        coords/              (N, 2) int64 level-0 top-left (x, y), written at creation
        done/                (N,) bool, a row is True once its features are on disk
        patch_tokens/        (N, h, w, d) float16, only when asked for

A batch is written features first, ``done`` second. zarr's local store replaces each chunk
file atomically, so a process killed at any moment leaves every row either done with its
features on disk, or not done: a rerun recomputes exactly the rows that are not done.

A store is never reused across identities: opening one made for another slide content,
encoder, weights file, tiling or pooling raises :class:`StoreError` naming what differs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm._filelock import pid_alive
from napari_gpfm.errors import ParameterError, StoreError

STORE_FORMAT = "napari-gpfm-embeddings"
FORMAT_VERSION = 1
# Rows per chunk of features/coords/done: 1024 x 1024-d float16 is 2 MiB, a cheap rewrite.
ROW_CHUNK = 1024
# Patch tokens are large (ViT-L: 512 KiB a row), so their chunks hold about this many bytes.
PATCH_CHUNK_BYTES = 16 << 20
DTYPES = ("float16", "float32")
POOLINGS = ("cls", "mean", "cls+mean")
LOCK_SUFFIX = ".lock"

# The keys whose values must match for a store to be reused; each with a readable label.
IDENTITY_LABELS = {
    "slide_fingerprint": "slide content (fingerprint)",
    "encoder_id": "encoder",
    "weights_sha256": "weights file (sha256)",
    "tiling_id": "tiling",
    "pooling": "pooling",
}
_REQUIRED_ARRAYS = ("features", "coords", "done")
_REQUIRED_ATTRS = (
    "format",
    "format_version",
    *IDENTITY_LABELS,
    "embed_dim",
    "tile_size_l0",
    "n_tiles",
)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _version() -> str:
    from napari_gpfm import __version__

    return __version__


def _jsonable(value: Any) -> Any:
    """Plain JSON values (tuples -> lists, numpy scalars -> Python, paths -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if re.fullmatch(r"[0-9a-f]{32,}", text) else text


def encoder_metadata(encoder: Any) -> dict[str, Any]:
    """The store attributes that describe an encoder (what, which weights, how it is fed).

    Reads only plain attributes of the loaded encoder (``spec``, ``encoder_id``,
    ``weights_sha256``, ``weights_path``, ``embed_dim``), so it needs no torch.
    """
    spec = encoder.spec
    meta = {
        "encoder_id": str(encoder.encoder_id),
        "encoder_name": str(spec.name),
        "weights_sha256": str(encoder.weights_sha256),
        "weights_path": str(getattr(encoder, "weights_path", "") or ""),
        "embed_dim": int(encoder.embed_dim),
        "preprocessing": {
            "input_size": int(spec.input_size),
            "mean": [float(v) for v in spec.mean],
            "std": [float(v) for v in spec.std],
            "interpolation": str(spec.interpolation),
        },
        "patch_grid": getattr(spec, "patch_grid", None),
        "token_dim": getattr(spec, "token_dim", None) or getattr(spec, "embed_dim", None),
        "licence": str(getattr(spec, "licence", "") or ""),
    }
    return _jsonable(meta)


def slide_stem(path: str | os.PathLike) -> str:
    """File name without its slide suffix (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def shared_store_folder(paths: Iterable[str | os.PathLike]) -> tuple[Path, Path] | None:
    """The first two of ``paths`` whose stores would share a folder (same file stem), if any.

    Stores are named after the slide's file name, so ``a/slide.svs`` and ``b/slide.svs`` cannot
    go into one output folder: the second would meet the first one's store. The same slide
    listed twice is a clash too (two ranks would write one store); deduplicate first.
    """
    seen: dict[str, Path] = {}
    for path in map(Path, paths):
        stem = slide_stem(path)
        if stem in seen:
            return seen[stem], path
        seen[stem] = path
    return None


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "encoder"


def default_store_path(
    out_dir: str | os.PathLike, slide: Any, encoder_name: str, spec: Any
) -> Path:
    """``<out_dir>/<slide stem>/<encoder>-<tiling id>.zarr``.

    ``encoder_name`` is made file-name safe (``timm:vit_s`` -> ``timm-vit_s``); ``spec`` is the
    TilingSpec (its ``id`` names the tiling).
    """
    path = Path(getattr(slide, "path", slide))
    return Path(out_dir) / slide_stem(path) / f"{_safe_name(encoder_name)}-{spec.id}.zarr"


def _remove_abandoned_builds(path: Path) -> None:
    """Delete half-built stores for ``path`` left by processes that no longer run."""
    if not path.parent.is_dir():
        return
    for old in path.parent.glob(f".{path.name}.creating-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


class EmbeddingStore:
    """Tile embeddings of one slide by one encoder on one tiling, on disk, resumable.

    Make one with :meth:`create`, reopen it with :meth:`open`. ``features`` / ``coords``
    give the rows that are done (all rows once :attr:`is_complete`), aligned with each other.
    """

    def __init__(self, path: Path, group: Any, *, writable: bool):
        self.path = path
        self._group = group
        self._writable = writable
        self._done_cache: np.ndarray | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        slide: Any,
        grid: Any,
        encoder_meta: Mapping[str, Any],
        dtype: str = "float16",
        patch_tokens_shape: tuple[int, int, int] | None = None,
        pooling: str = "cls",
        spec: Any = None,
        overwrite: bool = False,
    ) -> EmbeddingStore:
        """Create an empty store for ``grid`` of ``slide`` embedded by ``encoder_meta``.

        ``encoder_meta`` is :func:`encoder_metadata` of the encoder (or an equivalent dict).
        ``spec`` is the TilingSpec (defaults to ``grid.spec``). ``patch_tokens_shape``
        ``(h, w, d)`` adds a ``patch_tokens`` array. An existing path raises
        :class:`StoreError` unless ``overwrite`` and it is an embedding store (a folder that is
        not one is never deleted).
        """
        import zarr
        from zarr.codecs import ZstdCodec

        path = Path(path)
        if dtype not in DTYPES:
            raise ParameterError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")
        if pooling not in POOLINGS:
            raise ParameterError(f"pooling={pooling!r} is not supported; use one of {POOLINGS}")
        spec = spec if spec is not None else getattr(grid, "spec", None)
        if spec is None:
            raise ParameterError("EmbeddingStore.create needs the TilingSpec: pass spec=")
        meta = dict(encoder_meta)
        missing = [k for k in ("encoder_id", "encoder_name", "weights_sha256", "embed_dim")
                   if k not in meta]
        if missing:
            raise ParameterError(f"encoder_meta lacks {', '.join(missing)}")
        if path.exists():
            if not overwrite:
                raise StoreError(
                    f"{path} already exists; reuse it with the same settings, or pass "
                    "--overwrite (overwrite=True) to replace it"
                )
            cls._remove_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
        n = int(coords.shape[0])
        embed_dim = int(meta["embed_dim"])
        if pooling == "cls+mean":
            token_dim = int(meta.get("token_dim") or embed_dim)
            embed_dim = embed_dim + token_dim
        compressors = (ZstdCodec(level=1, checksum=True),)
        rows = max(1, min(ROW_CHUNK, n))
        # Built beside its destination and renamed into place when whole: a reader never sees
        # a half-made store, and a crash while creating leaves no store to trip over.
        building = path.with_name(f".{path.name}.creating-{os.getpid()}")
        _remove_abandoned_builds(path)
        group = zarr.open_group(str(building), mode="w", zarr_format=3)
        group.create_array(
            "features", shape=(n, embed_dim), chunks=(rows, embed_dim), dtype=dtype,
            fill_value=0, compressors=compressors,
        )
        carr = group.create_array(
            "coords", shape=(n, 2), chunks=(rows, 2), dtype="int64", fill_value=0,
            compressors=compressors,
        )
        if n:
            carr[:] = coords
        group.create_array(
            "done", shape=(n,), chunks=(rows,), dtype="bool", fill_value=False,
            compressors=compressors,
        )
        if patch_tokens_shape is not None:
            h, w, d = (int(v) for v in patch_tokens_shape)
            row_bytes = h * w * d * np.dtype(dtype).itemsize
            prow = max(1, min(n or 1, PATCH_CHUNK_BYTES // max(1, row_bytes)))
            group.create_array(
                "patch_tokens", shape=(n, h, w, d), chunks=(prow, h, w, d), dtype=dtype,
                fill_value=0, compressors=compressors,
            )

        tiling = _jsonable(spec.to_dict())
        slide_path = Path(getattr(slide, "path", ""))
        now = _now()
        attrs = {
            "format": STORE_FORMAT,
            "format_version": FORMAT_VERSION,
            "napari_gpfm_version": _version(),
            "created": now,
            "updated": now,
            "complete": n == 0,
            "n_tiles": n,
            "dtype": dtype,
            "pooling": pooling,
            "embed_dim": embed_dim,
            "encoder_id": meta["encoder_id"],
            "encoder_name": meta["encoder_name"],
            "weights_sha256": meta["weights_sha256"],
            "encoder": _jsonable(meta),
            "preprocessing": _jsonable(meta.get("preprocessing", {})),
            "tiling": tiling,
            "tiling_id": str(spec.id),
            "target_mpp": float(spec.mpp),
            "read_size": int(spec.read_size),
            "model_size": int(spec.model_size),
            "stride": int(getattr(spec, "stride", None) or spec.read_size),
            "min_tissue": float(getattr(spec, "min_tissue", 0.0)),
            "tissue": tiling.get("tissue", {}),
            "tile_size_l0": float(grid.tile_size_l0),
            "stride_l0": float(getattr(grid, "stride_l0", grid.tile_size_l0)),
            "slide_path": str(slide_path.resolve()) if str(slide_path) else "",
            "slide_name": slide_path.name,
            "slide_fingerprint": str(slide.fingerprint),
            "slide_dimensions": [int(v) for v in slide.dimensions],
            "slide_mpp": float(slide.mpp),
            "patch_tokens": patch_tokens_shape is not None,
        }
        group.attrs.update(attrs)
        try:
            os.rename(building, path)
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
            if path.exists():
                raise StoreError(
                    f"{path} was created by another run at the same time; run again to resume it"
                ) from None
            raise
        return cls(path, zarr.open_group(str(path), mode="r+", zarr_format=3), writable=True)

    @staticmethod
    def _remove_existing(path: Path) -> None:
        meta = path / "zarr.json"
        is_store = False
        if path.is_dir() and meta.is_file():
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(meta.read_text(encoding="utf-8"))
                is_store = doc.get("attributes", {}).get("format") == STORE_FORMAT
        if not is_store and path.is_dir() and any(path.iterdir()):
            raise StoreError(
                f"{path} exists and is not a napari-gpfm embedding store; refusing to delete it: "
                "choose another --out"
            )
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            raise StoreError(f"{path} is a file, not an embedding store; choose another --out")

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_identity: Mapping[str, Any] | None = None,
        *,
        mode: str = "r",
    ) -> EmbeddingStore:
        """Open an existing store (``mode="r"`` or ``"r+"`` to write into it).

        ``expected_identity`` (see :meth:`identity_of`) is compared with the store's; any
        difference raises :class:`StoreError` naming it. A folder that is not a complete
        store (missing arrays or attributes) raises :class:`StoreError` too.
        """
        import zarr

        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no embedding store at {path}; make one with `gpfm embed`")
        if not (path / "zarr.json").is_file():
            # `gpfm embed --out DIR` writes DIR/<slide>/<encoder>-<tiling>.zarr: a user who
            # passes the slide's folder is told which stores it holds.
            inside = sorted(p.name for p in path.glob("*.zarr") if (p / "zarr.json").is_file())
            hint = (f"; it holds {', '.join(inside)}: point to one of them" if inside else
                    "; point to a .zarr folder written by `gpfm embed`")
            raise StoreError(f"{path} is not an embedding store (no zarr.json){hint}")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            attrs = group.attrs.asdict()
            with warnings.catch_warnings():
                # zarr warns about its own temporary files while a writer replaces a chunk
                warnings.filterwarnings("ignore", message=".*not recognized as a component")
                arrays = set(group.array_keys())
        except Exception as exc:  # zarr raises many kinds for unreadable metadata
            raise StoreError(
                f"{path} is corrupted ({type(exc).__name__}); delete it or rerun with --overwrite"
            ) from None
        if attrs.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{path} is a zarr group but not a napari-gpfm embedding store; "
                "point to a store written by `gpfm embed`"
            )
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise StoreError(
                f"{path} was written by a newer napari-gpfm (store format "
                f"{attrs.get('format_version')}); upgrade napari-gpfm to read it"
            )
        missing = [f"array {a!r}" for a in _REQUIRED_ARRAYS if a not in arrays]
        missing += [f"attribute {a!r}" for a in _REQUIRED_ATTRS if a not in attrs]
        if attrs.get("patch_tokens") and "patch_tokens" not in arrays:
            missing.append("array 'patch_tokens'")
        if missing:
            raise StoreError(
                f"{path} is corrupted: missing {', '.join(missing)}; delete it or rerun with "
                "--overwrite"
            )
        store = cls(path, group, writable=mode == "r+")
        store._check_shapes()
        if expected_identity is not None:
            store.check_identity(expected_identity)
        return store

    def _check_shapes(self) -> None:
        n = int(self.attrs["n_tiles"])
        shapes = {name: self._group[name].shape for name in _REQUIRED_ARRAYS}
        ok = (
            shapes["features"] == (n, int(self.attrs["embed_dim"]))
            and shapes["coords"] == (n, 2)
            and shapes["done"] == (n,)
        )
        if self.has_patch_tokens:
            ok = ok and self._group["patch_tokens"].shape[0] == n
        if not ok:
            raise StoreError(
                f"{self.path} is corrupted: array shapes {shapes} do not match its {n} tiles; "
                "delete it or rerun with --overwrite"
            )

    # ------------------------------------------------------------------ identity
    @staticmethod
    def identity_of(
        *, slide: Any, encoder_meta: Mapping[str, Any], spec: Any, pooling: str = "cls"
    ) -> dict[str, str]:
        """The identity a store for these inputs must have (compare with :attr:`identity`)."""
        return {
            "slide_fingerprint": str(slide.fingerprint),
            "encoder_id": str(encoder_meta["encoder_id"]),
            "weights_sha256": str(encoder_meta["weights_sha256"]),
            "tiling_id": str(spec.id),
            "pooling": str(pooling),
        }

    @property
    def identity(self) -> dict[str, str]:
        """What this store was made from: slide fingerprint, encoder, weights, tiling, pooling."""
        attrs = self.attrs
        return {key: str(attrs[key]) for key in IDENTITY_LABELS}

    def identity_differences(self, expected: Mapping[str, Any]) -> list[str]:
        """Readable ``label: store X, wanted Y`` for each identity key that differs."""
        mine = self.identity
        out = []
        for key, label in IDENTITY_LABELS.items():
            if key in expected and str(expected[key]) != mine[key]:
                out.append(f"{label} is {_short(mine[key])}, wanted {_short(expected[key])}")
        return out

    def check_identity(self, expected: Mapping[str, Any]) -> None:
        """Raise :class:`StoreError` if ``expected`` differs from this store's identity."""
        diffs = self.identity_differences(expected)
        if not diffs:
            return
        made_from = str(self.attrs.get("slide_path") or "")
        if "slide_fingerprint" in expected and str(expected["slide_fingerprint"]) != \
                self.identity["slide_fingerprint"] and made_from:
            # Same file name, other content: often another slide of the same name (one folder
            # per patient), which --overwrite would silently replace.
            raise StoreError(
                f"{self.path} holds the embeddings of {made_from}, whose slide content differs "
                "from this slide's: if it is another slide of the same name, embed into another "
                "--out folder; if that slide file itself changed, use --overwrite"
            )
        raise StoreError(
            f"{self.path} was made with other inputs ({'; '.join(diffs)}); "
            "use --overwrite to replace it or another --out folder"
        )

    # ------------------------------------------------------------------ reading
    @property
    def attrs(self) -> dict[str, Any]:
        """All store attributes (a copy)."""
        return self._group.attrs.asdict()

    @property
    def n_tiles(self) -> int:
        return int(self._group["coords"].shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self._group["features"].shape[1])

    @property
    def tile_size_l0(self) -> float:
        """Level-0 pixels per tile side."""
        return float(self.attrs["tile_size_l0"])

    @property
    def has_patch_tokens(self) -> bool:
        return self._group.attrs.get("patch_tokens", False) is True

    @property
    def patch_tokens_shape(self) -> tuple[int, int, int] | None:
        if not self.has_patch_tokens:
            return None
        return tuple(int(v) for v in self._group["patch_tokens"].shape[1:])  # type: ignore[return-value]

    def _read(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        try:
            return np.asarray(self._group[name][selection])
        except Exception as exc:  # a damaged chunk surfaces as a codec or value error
            raise StoreError(
                f"{self.path} is corrupted: cannot read {name!r} ({type(exc).__name__}); "
                "delete it or rerun with --overwrite"
            ) from None

    @property
    def done(self) -> np.ndarray:
        """(N,) bool: which rows have their features on disk."""
        if self._done_cache is None:
            self._done_cache = self._read("done").astype(bool)
        return self._done_cache.copy()

    @property
    def done_indices(self) -> np.ndarray:
        """Row indices that are done, ascending."""
        return np.flatnonzero(self.done)

    @property
    def n_done(self) -> int:
        return int(self.done.sum())

    @property
    def is_complete(self) -> bool:
        """True once every row is done."""
        return self.n_done == self.n_tiles

    @property
    def all_coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 top-left of every tile of the grid, done or not."""
        return self._read("coords").astype(np.int64)

    @property
    def coords(self) -> np.ndarray:
        """(n_done, 2) int64 coordinates of the done rows (aligned with :attr:`features`)."""
        coords = self.all_coords
        done = self.done
        return coords if done.all() else coords[done]

    @property
    def features(self) -> np.ndarray:
        """(n_done, D) float32 features of the done rows (all rows once complete)."""
        return self.read_features()

    def read_features(self, indices: np.ndarray | None = None) -> np.ndarray:
        """float32 features of row ``indices`` (default: the done rows)."""
        if indices is None:
            done = self.done
            if done.all():
                return self._read("features").astype(np.float32)
            indices = np.flatnonzero(done)
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return self._read_rows("features", indices).astype(np.float32)

    def read_patch_tokens(self, indices: np.ndarray) -> np.ndarray:
        """float32 patch tokens ``(len(indices), h, w, d)`` of row ``indices``."""
        if not self.has_patch_tokens:
            raise StoreError(
                f"{self.path} has no patch tokens; embed again with --patch-tokens --overwrite"
            )
        indices = np.asarray(indices, dtype=np.int64)
        return self._read_rows("patch_tokens", indices).astype(np.float32)

    def _read_rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_tiles):
            raise ParameterError(
                f"row indices must lie in 0..{self.n_tiles - 1} for store {self.path}"
            )
        if _is_run(indices):
            return self._read(name, slice(int(indices[0]), int(indices[-1]) + 1))
        try:
            return np.asarray(self._group[name].oindex[indices])
        except Exception as exc:
            raise StoreError(
                f"{self.path} is corrupted: cannot read {name!r} ({type(exc).__name__}); "
                "delete it or rerun with --overwrite"
            ) from None

    # ------------------------------------------------------------------ writing
    def write(
        self,
        indices: np.ndarray,
        features: np.ndarray,
        patch_tokens: np.ndarray | None = None,
    ) -> None:
        """Write rows ``indices``: features (and patch tokens) first, then mark them done."""
        if not self._writable:
            raise StoreError(f"{self.path} was opened read-only; open it with mode='r+'")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        features = np.asarray(features)
        if features.shape != (indices.size, self.embed_dim):
            raise ParameterError(
                f"features of shape {features.shape} do not fit {indices.size} rows of "
                f"{self.embed_dim} values in {self.path}"
            )
        if indices.size == 0:
            return
        if indices.min() < 0 or indices.max() >= self.n_tiles:
            raise ParameterError(f"row indices must lie in 0..{self.n_tiles - 1}")
        farr = self._group["features"]
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
            values = features.astype(farr.dtype, copy=False)
        if not np.isfinite(values).all():
            where = "before" if not np.isfinite(features).all() else "after"
            raise ParameterError(
                f"features of rows {indices[:3].tolist()}... are not finite {where} conversion "
                f"to {farr.dtype}; "
                + ("store float32 features (dtype='float32')" if where == "after"
                   else "the encoder output is invalid: check its weights")
            )
        if patch_tokens is None and self.has_patch_tokens:
            raise ParameterError(f"{self.path} keeps patch tokens: pass patch_tokens too")
        run = _is_run(indices)
        sel = slice(int(indices[0]), int(indices[-1]) + 1) if run else None
        if patch_tokens is not None:
            if not self.has_patch_tokens:
                raise ParameterError(
                    f"{self.path} was created without patch tokens; recreate it with them"
                )
            parr = self._group["patch_tokens"]
            tokens = np.asarray(patch_tokens).astype(parr.dtype, copy=False)
            if tokens.shape != (indices.size, *parr.shape[1:]):
                raise ParameterError(
                    f"patch tokens of shape {tokens.shape} do not fit {parr.shape[1:]} per row"
                )
            if run:
                parr[sel] = tokens
            else:
                parr.oindex[indices] = tokens
        if run:
            farr[sel] = values
        else:
            farr.oindex[indices] = values
        darr = self._group["done"]
        if run:
            darr[sel] = True
        else:
            darr.oindex[indices] = np.ones(indices.size, bool)
        if self._done_cache is not None:
            self._done_cache[indices] = True

    def update_attrs(self, values: Mapping[str, Any]) -> None:
        """Add informational attributes (identity keys cannot be changed this way)."""
        if not self._writable:
            raise StoreError(f"{self.path} was opened read-only; open it with mode='r+'")
        protected = set(IDENTITY_LABELS) | set(_REQUIRED_ATTRS)
        clash = sorted(protected & set(values))
        if clash:
            raise ParameterError(f"store attributes {clash} are fixed at creation")
        self._group.attrs.update(_jsonable(dict(values)))

    def finalize(self) -> bool:
        """Record ``complete`` and the update time; return whether every row is done."""
        if not self._writable:
            return self.is_complete
        self._done_cache = None
        complete = self.is_complete
        self._group.attrs.update({"complete": complete, "updated": _now(),
                                  "n_done": self.n_done})
        return complete

    # ------------------------------------------------------------------ single writer
    def writer_lock(self):
        """Hold ``<store>.lock`` (beside the store) while writing, so two runs never fill one
        store at once. A lock left behind by a killed process on this machine is taken over.
        """
        from napari_gpfm._filelock import exclusive_lock

        return exclusive_lock(self.lock_path, lambda owner: StoreError(
            f"{self.path} is being written by another run (process {owner}); wait for it to "
            f"finish, or delete {self.lock_path} if that process is gone"
        ))

    @property
    def lock_path(self) -> Path:
        """The writer lock file, beside the store (zarr lists everything inside it)."""
        return self.path.with_name(self.path.name + LOCK_SUFFIX)

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, {self.attrs.get('encoder_name')}, "
            f"{self.n_done}/{self.n_tiles} tiles x {self.embed_dim})"
        )


def _is_run(indices: np.ndarray) -> bool:
    """True if ``indices`` is a contiguous ascending run (so a slice can replace it)."""
    return indices.size > 0 and int(indices[-1]) - int(indices[0]) + 1 == indices.size and bool(
        np.all(np.diff(indices) == 1)
    )
