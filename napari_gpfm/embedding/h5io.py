"""TRIDENT / CLAM style HDF5 feature files: export a store to one, read or import one.

The layout those tools share (TRIDENT ``extract_patch_features``, CLAM ``extract_features_fp``):

* dataset ``features`` ``(N, D)`` float32, dataset ``coords`` ``(N, 2)`` level-0 ``(x, y)``;
* the tiling is described by attributes of the ``coords`` dataset. TRIDENT writes
  ``patch_size`` (pixels at the target magnification), ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification`` (objective powers, 10 / mpp), ``overlap``
  (target pixels) and ``name``; CLAM writes ``patch_size``, ``patch_level`` and ``downsample``
  (of that level), which TRIDENT reads as its "legacy" format.

We write the TRIDENT attributes (plus CLAM's ``patch_level``/``downsample`` so either reads the
file), exact ``target_mpp``/``level0_mpp`` and, at the root, every attribute of the store as
JSON so that importing our own file restores the store's identity exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_gpfm.embedding.store import EmbeddingStore, _jsonable, slide_stem
from napari_gpfm.errors import ParameterError, StoreError

ROOT_ATTR = "napari_gpfm"


def _magnification(mpp: float) -> int | float:
    """Objective power for ``mpp`` (10 / mpp), an int when within 2% of one (as TRIDENT writes)."""
    mag = 10.0 / mpp
    near = round(mag)
    return int(near) if near > 0 and abs(mag - near) <= 0.02 * near else round(mag, 3)


def export_h5(
    store: EmbeddingStore, path: str | os.PathLike, *, allow_incomplete: bool = False
) -> Path:
    """Write ``store`` (its done rows) as a TRIDENT/CLAM-style ``.h5`` file; return the path.

    An incomplete store raises :class:`StoreError` unless ``allow_incomplete``. The file is
    written beside its destination and renamed, so a failure never leaves half a file.
    """
    import h5py

    if not store.is_complete and not allow_incomplete:
        raise StoreError(
            f"{store.path} is incomplete ({store.n_done} of {store.n_tiles} tiles); finish it "
            "with `gpfm embed` (same settings) before exporting"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise ParameterError(f"cannot write {path}: the folder {path.parent} does not exist")
    attrs = store.attrs
    features = store.features
    coords = store.coords
    read_size = int(attrs["read_size"])
    stride = int(attrs.get("stride") or read_size)
    target_mpp = float(attrs["target_mpp"])
    slide_mpp = float(attrs["slide_mpp"])
    tile_l0 = float(attrs["tile_size_l0"])
    coord_attrs = {
        "patch_size": read_size,
        "patch_size_level0": int(round(tile_l0)),
        "level0_magnification": _magnification(slide_mpp),
        "target_magnification": _magnification(target_mpp),
        "overlap": max(0, read_size - stride),
        "name": slide_stem(attrs.get("slide_name") or attrs.get("slide_path") or path.stem),
        "patch_level": 0,
        "downsample": np.array([1.0, 1.0]),
        "target_mpp": target_mpp,
        "level0_mpp": slide_mpp,
        "tile_size_level0": tile_l0,
    }
    feature_attrs = {
        "name": coord_attrs["name"],
        "encoder": str(attrs["encoder_name"]),
        "encoder_id": str(attrs["encoder_id"]),
        "weights_sha256": str(attrs["weights_sha256"]),
        "pooling": str(attrs.get("pooling", "cls")),
    }
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with h5py.File(tmp, "w") as fh:
            dset = fh.create_dataset("features", data=features.astype(np.float32))
            for key, value in feature_attrs.items():
                dset.attrs[key] = value
            cset = fh.create_dataset("coords", data=coords.astype(np.int64))
            for key, value in coord_attrs.items():
                cset.attrs[key] = value
            fh.attrs[ROOT_ATTR] = json.dumps(_jsonable(attrs), sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class H5Features:
    """Features and coordinates read from an h5 file, with what its attributes say."""

    path: Path
    features: np.ndarray
    coords: np.ndarray
    coord_attrs: dict[str, Any]
    store_attrs: dict[str, Any] | None
    patch_size: int | None
    patch_size_level0: float | None
    target_mpp: float | None
    overlap: int

    @property
    def source(self) -> str:
        if self.store_attrs is not None:
            return "napari-gpfm"
        return "trident" if "patch_size_level0" in self.coord_attrs else "clam"


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _number(attrs: dict[str, Any], key: str) -> float | None:
    value = attrs.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def read_h5(path: str | os.PathLike) -> H5Features:
    """Read ``features`` and ``coords`` of a TRIDENT, CLAM or napari-gpfm h5 file.

    ``patch_size_level0`` comes from TRIDENT's attribute, else from ``patch_size`` times the
    magnification ratio, else (CLAM) ``patch_size`` times the level ``downsample``.
    Raises :class:`StoreError` for a missing, unreadable or inconsistent file.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"h5 feature file not found: {path}")
    try:
        with h5py.File(path, "r") as fh:
            missing = [k for k in ("features", "coords") if k not in fh]
            if missing:
                raise StoreError(
                    f"{path} has no {' or '.join(repr(m) for m in missing)} dataset; expected a "
                    "TRIDENT/CLAM feature file with 'features' and 'coords'"
                )
            features = np.asarray(fh["features"][()])
            coords = np.asarray(fh["coords"][()])
            coord_attrs = {k: _attr(v) for k, v in fh["coords"].attrs.items()}
            root = fh.attrs.get(ROOT_ATTR)
    except StoreError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"cannot read {path} as HDF5 ({exc}); is it a feature .h5 file?") from None
    if features.ndim == 3 and features.shape[0] == 1:  # some tools keep a leading batch axis
        features = features[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreError(
            f"{path}: expected features (N, D) and coords (N, 2), found {features.shape} and "
            f"{coords.shape}"
        )
    if len(features) != len(coords):
        raise StoreError(
            f"{path}: {len(features)} feature rows but {len(coords)} coordinates; the file is "
            "inconsistent"
        )
    store_attrs = None
    if root is not None:
        try:
            store_attrs = json.loads(_attr(root))
        except (TypeError, ValueError):
            raise StoreError(f"{path}: its {ROOT_ATTR!r} attribute is not valid JSON") from None
    patch = _number(coord_attrs, "patch_size")
    l0 = _number(coord_attrs, "tile_size_level0") or _number(coord_attrs, "patch_size_level0")
    mag0 = _number(coord_attrs, "level0_magnification")
    magt = _number(coord_attrs, "target_magnification")
    if l0 is None and patch and mag0 and magt:
        l0 = patch * mag0 / magt
    if l0 is None and patch and "patch_level" in coord_attrs:
        l0 = patch * (_number(coord_attrs, "downsample") or 1.0) * (
            _number(coord_attrs, "custom_downsample") or 1.0
        )
    target_mpp = _number(coord_attrs, "target_mpp")
    if target_mpp is None and magt:
        target_mpp = 10.0 / magt
    overlap = int(_number(coord_attrs, "overlap") or 0)
    return H5Features(
        path=path,
        features=features.astype(np.float32, copy=False),
        coords=np.rint(coords).astype(np.int64),
        coord_attrs=coord_attrs,
        store_attrs=store_attrs,
        patch_size=int(patch) if patch else None,
        patch_size_level0=l0,
        target_mpp=target_mpp,
        overlap=overlap,
    )


def import_h5(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    slide: Any = None,
    encoder_name: str | None = None,
    overwrite: bool = False,
) -> EmbeddingStore:
    """Make a complete embedding store at ``out`` from an h5 feature file.

    A file written by :func:`export_h5` restores the original store identity (and, when
    ``slide`` is given, its fingerprint must match). A TRIDENT/CLAM file needs ``slide`` (for
    its fingerprint and pixel size); its tiling is rebuilt from the file's attributes and the
    encoder is recorded as ``encoder_name`` (default: the file's ``encoder`` attribute or
    ``"imported"``), with the h5 file's sha256 in place of a weights hash.
    """
    data = read_h5(path)
    if data.store_attrs is not None:
        return _import_own(data, out, slide=slide, overwrite=overwrite)
    if slide is None:
        raise ParameterError(
            f"{data.path} was not written by napari-gpfm: pass the slide it was made from "
            "(slide=...) so that the store records its fingerprint and pixel size"
        )
    return _import_foreign(data, out, slide=slide, encoder_name=encoder_name,
                           overwrite=overwrite)


def _import_own(data: H5Features, out, *, slide: Any, overwrite: bool) -> EmbeddingStore:
    from napari_gpfm.tiling import TileGrid, TilingSpec

    attrs = data.store_attrs
    assert attrs is not None
    if slide is not None and str(slide.fingerprint) != str(attrs.get("slide_fingerprint")):
        raise StoreError(
            f"{data.path} holds embeddings of another slide (fingerprint "
            f"{str(attrs.get('slide_fingerprint'))[:12]}, not {str(slide.fingerprint)[:12]})"
        )
    try:
        spec = TilingSpec.from_dict(attrs["tiling"])
        meta = dict(attrs["encoder"])
        dims = tuple(int(v) for v in attrs["slide_dimensions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{data.path}: its napari-gpfm attributes are incomplete ({exc})") from None
    grid = TileGrid(
        coords=data.coords,
        tissue_fraction=np.ones(len(data.coords)),
        tile_size_l0=float(attrs["tile_size_l0"]),
        stride_l0=float(attrs.get("stride_l0", attrs["tile_size_l0"])),
        spec=spec,
        slide_dims=dims,  # type: ignore[arg-type]
        slide_mpp=float(attrs["slide_mpp"]),
        candidates=len(data.coords),
    )
    source = slide if slide is not None else _RecordedSlide(attrs)
    store = EmbeddingStore.create(
        out, slide=source, grid=grid, encoder_meta=meta, dtype=str(attrs.get("dtype", "float16")),
        pooling=str(attrs.get("pooling", "cls")), spec=spec, overwrite=overwrite,
    )
    _fill(store, data)
    return store


@dataclass(frozen=True)
class _RecordedSlide:
    """The slide facts a store records, taken from an exported file instead of the slide."""

    attrs: dict[str, Any]

    @property
    def path(self) -> Path:
        return Path(self.attrs.get("slide_path") or self.attrs.get("slide_name") or "")

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["slide_fingerprint"])

    @property
    def dimensions(self) -> tuple[int, int]:
        w, h = self.attrs["slide_dimensions"]
        return int(w), int(h)

    @property
    def mpp(self) -> float:
        return float(self.attrs["slide_mpp"])


def _import_foreign(
    data: H5Features, out, *, slide: Any, encoder_name: str | None, overwrite: bool
) -> EmbeddingStore:
    from napari_gpfm.tiling import TileGrid, TilingSpec

    if data.patch_size is None or data.patch_size_level0 is None:
        raise StoreError(
            f"{data.path}: its coords attributes do not give the tile size (need patch_size "
            "with patch_size_level0, magnifications, or CLAM's downsample)"
        )
    target_mpp = slide.mpp * data.patch_size_level0 / data.patch_size
    stride = max(1, data.patch_size - data.overlap)
    spec = TilingSpec(mpp=round(target_mpp, 6), read_size=data.patch_size,
                      model_size=data.patch_size, stride=stride, min_tissue=0.0)
    tile_l0 = float(data.patch_size_level0)
    grid = TileGrid(
        coords=data.coords,
        tissue_fraction=np.ones(len(data.coords)),
        tile_size_l0=tile_l0,
        stride_l0=tile_l0 * stride / data.patch_size,
        spec=spec,
        slide_dims=tuple(slide.dimensions),  # type: ignore[arg-type]
        slide_mpp=float(slide.mpp),
        candidates=len(data.coords),
    )
    name = encoder_name or _file_encoder_name(data.path) or "imported"
    file_sha = _sha256(data.path)
    meta = {
        "encoder_id": f"{name}@h5-{file_sha[:12]}",
        "encoder_name": name,
        "weights_sha256": f"unknown (imported from {data.path.name}, sha256 {file_sha})",
        "embed_dim": int(data.features.shape[1]),
        "preprocessing": {},
    }
    store = EmbeddingStore.create(
        out, slide=slide, grid=grid, encoder_meta=meta, dtype="float32", spec=spec,
        overwrite=overwrite,
    )
    store.update_attrs(
        {"imported_from": str(data.path.resolve()), "imported_format": data.source}
    )
    _fill(store, data)
    return store


def _file_encoder_name(path: Path) -> str | None:
    import h5py

    with h5py.File(path, "r") as fh:
        for key in ("encoder", "model", "model_name"):
            if key in fh["features"].attrs:
                return str(_attr(fh["features"].attrs[key]))
    return None


def _fill(store: EmbeddingStore, data: H5Features) -> None:
    if store.n_tiles:
        store.write(np.arange(store.n_tiles), data.features)
    store.finalize()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
