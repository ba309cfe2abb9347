"""Embedding stores as the library's sources: finding them, reading them, checking them.

A library holds one encoder (id + weights sha256), one tiling and one pooling: the vectors of
two encoders live in unrelated spaces and two tilings give tiles of different size, so their
similarities mean nothing. What a slide's entry records of its store (created / updated
times, tile count, identity) is compared with the store later to notice a store that changed
after it was added.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_gpfm.errors import ParameterError, StoreError

# What must be equal across a library, with readable labels.
LIBRARY_IDENTITY = {
    "encoder_id": "encoder",
    "weights_sha256": "weights (sha256)",
    "tiling_id": "tiling",
    "pooling": "pooling",
    "embed_dim": "embedding size",
}
# What identifies the state of a store when it was added. ``created`` / ``updated`` have
# one-second resolution; the group metadata file's mtime (rewritten with every attribute
# change, e.g. when a rerun finalises the store) catches changes within the same second.
STAMP_KEYS = ("slide_fingerprint", "encoder_id", "weights_sha256", "tiling_id", "pooling",
              "created", "updated", "n_tiles", "meta_mtime_ns")


def _is_store_dir(path: Path) -> bool:
    from napari_gpfm.embedding.store import STORE_FORMAT

    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return path.suffix == ".zarr"  # a damaged store: let opening it explain
    return doc.get("attributes", {}).get("format") == STORE_FORMAT


def _zarr_dirs(root: Path) -> list[Path]:
    """``*.zarr`` folders under ``root``, without descending into them (a store holds
    thousands of chunk files)."""
    out = []
    for folder, subdirs, _files in os.walk(root):
        keep = []
        for name in subdirs:
            (out if name.endswith(".zarr") else keep).append(Path(folder) / name)
        subdirs[:] = [p.name for p in keep]
    return out


def find_stores(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand ``paths`` into embedding stores: a store is kept, a folder is searched for
    ``*.zarr`` stores (recursively, sorted). Duplicates are dropped, order is kept.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ParameterError(f"{path} does not exist; pass embedding stores (.zarr) or folders")
        if path.is_dir() and (path.suffix == ".zarr" or _is_store_dir(path)):
            found.append(path.resolve())
            continue
        if not path.is_dir():
            raise ParameterError(
                f"{path} is a file, not an embedding store; pass .zarr stores or folders of them"
            )
        inside = sorted(p.resolve() for p in _zarr_dirs(path) if _is_store_dir(p))
        if not inside:
            raise ParameterError(
                f"no embedding stores (*.zarr) under {path}; make them with `gpfm embed`"
            )
        found.extend(inside)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ParameterError("no embedding stores given; pass .zarr stores or folders of them")
    return unique


@dataclass(frozen=True)
class StoreSource:
    """One complete embedding store, as the library sees it."""

    path: Path
    attrs: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike) -> StoreSource:
        """Open a store; an incomplete one raises :class:`StoreError`."""
        from napari_gpfm.embedding.store import EmbeddingStore

        store = EmbeddingStore.open(path)
        if not store.is_complete:
            raise StoreError(
                f"{store.path} is incomplete ({store.n_done}/{store.n_tiles} tiles embedded); "
                "finish it with `gpfm embed` before adding it to a library"
            )
        attrs = store.attrs
        attrs["n_tiles"] = store.n_tiles
        return cls(Path(store.path).resolve(), attrs)

    def store(self):
        """The underlying :class:`EmbeddingStore` (opened read-only)."""
        from napari_gpfm.embedding.store import EmbeddingStore

        return EmbeddingStore.open(self.path)

    @property
    def identity(self) -> dict[str, Any]:
        """The keys that must match the library's (see :data:`LIBRARY_IDENTITY`)."""
        out = {key: str(self.attrs.get(key, "")) for key in LIBRARY_IDENTITY}
        out["embed_dim"] = int(self.attrs["embed_dim"])
        out["pooling"] = str(self.attrs.get("pooling", "cls"))
        return out

    @property
    def stamp(self) -> dict[str, Any]:
        """The store's state now, compared later to notice changes."""
        stamp = {key: self.attrs.get(key) for key in STAMP_KEYS}
        try:
            stamp["meta_mtime_ns"] = (self.path / "zarr.json").stat().st_mtime_ns
        except OSError:
            stamp["meta_mtime_ns"] = None
        return stamp

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["slide_fingerprint"])

    def slide_record(self) -> dict[str, Any]:
        """What the library keeps about this slide (without its library id and files)."""
        a = self.attrs
        return {
            "slide_path": str(a.get("slide_path", "")),
            "slide_name": str(a.get("slide_name") or Path(str(a.get("slide_path", ""))).name),
            "slide_fingerprint": self.fingerprint,
            "slide_mpp": float(a.get("slide_mpp") or 0.0),
            "slide_dimensions": list(a.get("slide_dimensions") or []),
            "tile_size_l0": float(a["tile_size_l0"]),
            "stride_l0": float(a.get("stride_l0") or a["tile_size_l0"]),
            "n_tiles": int(a["n_tiles"]),
            "store_path": str(self.path),
            "store_stamp": self.stamp,
        }

    def library_settings(self) -> dict[str, Any]:
        """The library-wide settings this store brings (recorded by the first store)."""
        a = self.attrs
        encoder = dict(a.get("encoder") or {})
        return {
            "identity": self.identity,
            "encoder_name": str(a.get("encoder_name", "")),
            "weights_path": str(encoder.get("weights_path", "")),
            "tiling": a.get("tiling", {}),
            "target_mpp": a.get("target_mpp"),
        }


def identity_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Readable ``label X vs Y`` for each library identity key that differs."""

    def short(v: Any) -> str:
        text = str(v)
        return text[:12] if len(text) >= 32 else text

    return [
        f"{label} {short(found.get(key))} instead of {short(expected.get(key))}"
        for key, label in LIBRARY_IDENTITY.items()
        if str(expected.get(key)) != str(found.get(key))
    ]


def check_compatible(source: StoreSource, identity: dict[str, Any], library: str) -> None:
    """Refuse a store made with another encoder, weights, tiling or pooling than the library."""
    diffs = identity_differences(identity, source.identity)
    if diffs:
        raise StoreError(
            f"{source.path} cannot join {library}: {'; '.join(diffs)} (one library holds one "
            "encoder + weights + tiling; build a separate library for these stores)"
        )


def stamp_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The stamp keys whose value differs between what was recorded and the store now."""
    return [key for key in STAMP_KEYS if str(recorded.get(key)) != str(current.get(key))]
