"""Viewer state shared by the widgets: which slide a layer shows, its embeddings, its scores.

Qt-free (it reads napari layers but never touches Qt). A :class:`SlideRef` describes a slide
layer: its file, content fingerprint and how level-0 pixels map to world micrometres. A
:class:`SlideSession` (one per slide fingerprint) remembers which embedding store the widgets
use for that slide and the per-tile scores computed in this session (similarity, class
probabilities), so the Maps widget can show what the Similar and Classifier widgets made.

Coordinates: napari centres data pixel ``i`` on ``translate + i * scale``; level-0 pixel ``i``
covers ``[i, i + 1)`` in our level-0 convention, so level-0 ``x`` is world
``(x - 0.5) * scale + translate`` (the same convention as ``TileRaster.napari_transform``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import SignalInstance

from napari_gpfm.errors import ParameterError, StoreError

SLIDE_KEY = "gpfm_slide"
OVERLAY_KEY = "gpfm_overlay"
TILES_KEY = "gpfm_tiles"
STORE_FOLDER = "gpfm-embeddings"
NO_EMBEDDINGS = (
    "no embeddings for {name} yet: embed this slide first (Plugins > napari-gpfm > Embed), "
    "or choose its store with 'Choose store…'"
)


# ----------------------------------------------------------------------------- slide refs
@dataclass(frozen=True)
class SlideRef:
    """A slide as shown in the viewer: file, fingerprint and level-0 -> world transform."""

    path: Path
    fingerprint: str
    name: str
    dims: tuple[int, int]
    mpp: float | None
    scale_yx: tuple[float, float]
    translate_yx: tuple[float, float]

    @classmethod
    def from_layer(cls, layer: Any) -> SlideRef | None:
        """The slide behind an image layer opened by our reader, else None."""
        meta = getattr(layer, "metadata", None) or {}
        info = meta.get(SLIDE_KEY) if isinstance(meta, Mapping) else None
        if not isinstance(info, Mapping) or not info.get("path") or not info.get("fingerprint"):
            return None
        scale = tuple(float(v) for v in np.asarray(layer.scale)[-2:])
        translate = tuple(float(v) for v in np.asarray(layer.translate)[-2:])
        # The layer's name, not the file's: napari keeps layer names unique ("x.svs [1]" for a
        # second x.svs), and result layers are named after it, so two slides of the same file
        # name never share (and overwrite) each other's maps.
        return cls.from_metadata(
            {**info, "name": layer.name, "scale": scale, "translate": translate}
        )

    @classmethod
    def from_metadata(cls, info: Mapping) -> SlideRef:
        """Rebuild from :meth:`to_metadata` (what overlay and ROI layers carry)."""
        mpp = info.get("mpp")
        scale = info.get("scale")
        if scale is None:
            scale = (mpp, mpp) if mpp else (1.0, 1.0)
        translate = info.get("translate") or (0.0, 0.0)
        dims = info.get("dimensions") or (0, 0)
        path = Path(str(info["path"]))
        return cls(
            path=path,
            fingerprint=str(info["fingerprint"]),
            name=str(info.get("name") or path.name),
            dims=(int(dims[0]), int(dims[1])),
            mpp=None if mpp is None else float(mpp),
            scale_yx=(float(scale[0]), float(scale[1])),
            translate_yx=(float(translate[0]), float(translate[1])),
        )

    def to_metadata(self) -> dict:
        """Plain data for ``layer.metadata[SLIDE_KEY]`` of layers drawn over this slide."""
        return {
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "name": self.name,
            "dimensions": list(self.dims),
            "mpp": self.mpp,
            "scale": list(self.scale_yx),
            "translate": list(self.translate_yx),
        }

    @property
    def has_mpp(self) -> bool:
        return self.mpp is not None

    def level0_to_world(self, xy: np.ndarray) -> np.ndarray:
        """Level-0 ``(x, y)`` points ``(N, 2)`` -> world ``(y, x)`` (micrometres)."""
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        sy, sx = self.scale_yx
        ty, tx = self.translate_yx
        return np.column_stack([(pts[:, 1] - 0.5) * sy + ty, (pts[:, 0] - 0.5) * sx + tx])

    def world_to_level0(self, world_yx: np.ndarray) -> np.ndarray:
        """World ``(y, x)`` points ``(N, 2)`` -> level-0 ``(x, y)``."""
        pts = np.asarray(world_yx, dtype=np.float64).reshape(-1, 2)
        sy, sx = self.scale_yx
        ty, tx = self.translate_yx
        return np.column_stack([(pts[:, 1] - tx) / sx + 0.5, (pts[:, 0] - ty) / sy + 0.5])

    def layer_kwargs(self) -> dict:
        """scale/translate/units that put a layer in this slide's level-0 data space."""
        kwargs: dict[str, Any] = {"scale": self.scale_yx, "translate": self.translate_yx}
        if self.has_mpp:
            kwargs["units"] = ("um", "um")
        return kwargs

    def level0_to_data(self, xy: np.ndarray) -> np.ndarray:
        """Level-0 ``(x, y)`` -> ``(y, x)`` data coords of layers made with ``layer_kwargs``."""
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.column_stack([pts[:, 1] - 0.5, pts[:, 0] - 0.5])


def slide_layers(viewer: Any) -> list:
    """Image layers of ``viewer`` that show a slide opened by napari-gpfm, in layer order."""
    return [layer for layer in viewer.layers if SlideRef.from_layer(layer) is not None]


# ----------------------------------------------------------------------------- stores
def user_cache_dir() -> Path:
    """Per-user folder for embeddings of slides whose own folder is not writable."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "napari-gpfm" / "embeddings"


def _writable(folder: Path) -> bool:
    probe = folder / STORE_FOLDER
    target = probe if probe.exists() else folder
    return target.is_dir() and os.access(target, os.W_OK | os.X_OK)


def default_output_dir(slide_path: str | os.PathLike) -> Path:
    """``<slide folder>/gpfm-embeddings`` when writable, else :func:`user_cache_dir`.

    Slides shipped inside the package (the bundled sample) always go to the cache folder so
    that an installation is never written into.
    """
    import napari_gpfm

    slide_dir = Path(slide_path).expanduser().resolve().parent
    package_dir = Path(napari_gpfm.__file__).resolve().parent
    if not slide_dir.is_relative_to(package_dir) and _writable(slide_dir):
        return slide_dir / STORE_FOLDER
    return user_cache_dir()


@dataclass(frozen=True)
class StoreInfo:
    """What a store's metadata says, read without opening zarr."""

    path: Path
    slide_fingerprint: str
    encoder_name: str
    encoder_id: str
    tiling_id: str
    complete: bool
    n_tiles: int
    updated: str

    @property
    def label(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"{self.encoder_name} · tiling {self.tiling_id} · {self.n_tiles} tiles ({state})"


def read_store_info(path: str | os.PathLike) -> StoreInfo | None:
    """The identity of the store at ``path`` from its ``zarr.json``; None if it is not one."""
    from napari_gpfm.embedding.store import STORE_FORMAT

    meta_file = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta_file.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(attrs, dict) or attrs.get("format") != STORE_FORMAT:
        return None
    return StoreInfo(
        path=Path(path),
        slide_fingerprint=str(attrs.get("slide_fingerprint", "")),
        encoder_name=str(attrs.get("encoder_name", "?")),
        encoder_id=str(attrs.get("encoder_id", "?")),
        tiling_id=str(attrs.get("tiling_id", "?")),
        complete=bool(attrs.get("complete", False)),
        n_tiles=int(attrs.get("n_tiles", 0)),
        updated=str(attrs.get("updated", "")),
    )


def find_stores(ref: SlideRef, extra_dirs: tuple[Path, ...] = ()) -> list[StoreInfo]:
    """Stores of this slide's content in the default folders, complete and newest first."""
    from napari_gpfm.embedding.store import slide_stem

    stem = slide_stem(ref.path)
    bases = [
        *extra_dirs,
        default_output_dir(ref.path),
        ref.path.parent / STORE_FOLDER,
        user_cache_dir(),
    ]
    seen: set[Path] = set()
    found: list[StoreInfo] = []
    for base in bases:
        folder = Path(base) / stem
        if not folder.is_dir():
            continue
        for candidate in sorted(folder.glob("*.zarr")):
            key = candidate.resolve()
            if key in seen:
                continue
            seen.add(key)
            info = read_store_info(candidate)
            if info is not None and info.slide_fingerprint == ref.fingerprint:
                found.append(info)
    found.sort(key=lambda i: (not i.complete, _negated(i.updated)))
    return found


def _negated(text: str) -> tuple:
    # Newest first inside each completeness group: invert the ISO timestamp's characters.
    return tuple(-ord(c) for c in text)


# ----------------------------------------------------------------------------- tiles
@dataclass(frozen=True, eq=False)
class TileSet:
    """The embedded tiles of one slide, as the analysis widgets use them.

    ``features`` and ``coords`` hold the rows that are done, aligned with each other.
    """

    ref: SlideRef
    store_path: Path
    features: np.ndarray
    coords: np.ndarray
    tile_size_l0: float
    stride_l0: float
    slide_dims: tuple[int, int]
    slide_mpp: float
    encoder_id: str
    encoder_name: str
    tiling_id: str
    n_grid: int

    def __len__(self) -> int:
        return len(self.coords)

    @cached_property
    def normed(self) -> np.ndarray:
        """L2-normalised features, computed once per tile set (for similarity search)."""
        from napari_gpfm.analysis.search import normalize

        return normalize(self.features)

    @property
    def tile_area_mm2(self) -> float:
        from napari_gpfm.analysis.geometry import tile_area_mm2

        return tile_area_mm2(self.tile_size_l0, self.slide_mpp, self.stride_l0)

    @property
    def is_partial(self) -> bool:
        return len(self) < self.n_grid

    def provenance(self) -> dict:
        """Which slide, encoder and tiling made a result: recorded on every overlay layer."""
        return {
            "slide_path": str(self.ref.path),
            "slide_fingerprint": self.ref.fingerprint,
            "slide_name": self.ref.name,
            "encoder_id": self.encoder_id,
            "encoder_name": self.encoder_name,
            "tiling_id": self.tiling_id,
            "store": str(self.store_path),
            "tile_size_l0": self.tile_size_l0,
            "stride_l0": self.stride_l0,
            "slide_mpp": self.slide_mpp,
            "n_tiles": len(self),
        }


@dataclass
class ScoreMap:
    """A per-tile score computed in this session, aligned with one :class:`TileSet`."""

    name: str
    values: np.ndarray
    tiles: TileSet
    description: str = ""


@dataclass
class SlideSession:
    """What the widgets know about one slide: its store, its tiles and scores made so far."""

    ref: SlideRef
    store_path: Path | None = None
    scores: dict[str, ScoreMap] = field(default_factory=dict)
    _tiles: TileSet | None = None
    _tiles_key: tuple | None = None

    def use_store(self, path: str | os.PathLike) -> StoreInfo:
        """Use the store at ``path`` for this slide; refuse one made from another slide."""
        from napari_gpfm.embedding.store import EmbeddingStore

        path = Path(path)
        store = EmbeddingStore.open(path)  # raises StoreError with a readable line
        attrs = store.attrs
        if str(attrs.get("slide_fingerprint")) != self.ref.fingerprint:
            raise StoreError(
                f"store {path.name} was made from another slide "
                f"({attrs.get('slide_name') or 'unknown'}, different content fingerprint), not "
                f"{self.ref.name}; choose this slide's store or embed this slide"
            )
        switched = self.store_path is None or Path(self.store_path).resolve() != path.resolve()
        if switched:
            self.scores.clear()
            self._tiles = None
            self._tiles_key = None
        self.store_path = path
        info = read_store_info(path)
        assert info is not None  # open() above checked the format
        if switched:
            STORE_CHANGED.emit(self.ref.fingerprint)
        return info

    def current_store(self) -> StoreInfo | None:
        """The store in use, discovering one in the default folders if none was chosen."""
        if self.store_path is not None and not Path(self.store_path).exists():
            self.store_path = None
            self.scores.clear()
            self._tiles = None
        if self.store_path is None:
            found = find_stores(self.ref)
            if not found:
                return None
            self.store_path = found[0].path
        return read_store_info(self.store_path)

    def tiles(self) -> TileSet:
        """The embedded tiles (done rows) of the store in use; ParameterError if there are none."""
        from napari_gpfm.embedding.store import EmbeddingStore

        if self.current_store() is None:
            raise ParameterError(NO_EMBEDDINGS.format(name=self.ref.name))
        path = Path(self.store_path)
        store = EmbeddingStore.open(path)
        n_done = store.n_done
        if n_done == 0:
            raise ParameterError(
                f"the embedding of {self.ref.name} has no finished tile yet ({path.name}); "
                "embed this slide first"
            )
        key = (str(path.resolve()), n_done)
        if self._tiles is not None and self._tiles_key == key:
            if self._tiles.ref != self.ref:
                # The slide layer was renamed or moved: the same rows under its new name and
                # place (results are named after it and drawn where it is), scores kept.
                fresh = replace(self._tiles, ref=self.ref)
                for score in self.scores.values():
                    if score.tiles is self._tiles:
                        score.tiles = fresh
                self._tiles = fresh
            return self._tiles
        attrs = store.attrs
        self._tiles = TileSet(
            ref=self.ref,
            store_path=path,
            features=store.features,
            coords=store.coords,
            tile_size_l0=float(attrs["tile_size_l0"]),
            stride_l0=float(attrs.get("stride_l0", attrs["tile_size_l0"])),
            slide_dims=tuple(int(v) for v in attrs.get("slide_dimensions", self.ref.dims)),
            slide_mpp=float(attrs.get("slide_mpp") or self.ref.mpp or 1.0),
            encoder_id=str(attrs["encoder_id"]),
            encoder_name=str(attrs.get("encoder_name", "")),
            tiling_id=str(attrs["tiling_id"]),
            n_grid=store.n_tiles,
        )
        self._tiles_key = key
        # Scores of an older tile set no longer line up with the rows.
        self.scores = {k: s for k, s in self.scores.items() if s.tiles is self._tiles}
        return self._tiles

    def publish_score(
        self, name: str, values: np.ndarray, tiles: TileSet, description: str = ""
    ) -> None:
        """Remember a per-tile score so other widgets (Maps) can show it."""
        vals = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(vals) != len(tiles):
            raise ParameterError(f"score {name!r} has {len(vals)} values for {len(tiles)} tiles")
        self.scores[name] = ScoreMap(name, vals, tiles, description)

    def current_scores(self) -> list[ScoreMap]:
        """Scores that still line up with the current tiles, newest last."""
        try:
            tiles = self.tiles()
        except (ParameterError, StoreError):
            return []
        return [s for s in self.scores.values() if s.tiles is tiles]


_SESSIONS: dict[str, SlideSession] = {}
# Emitted with the slide's fingerprint when a session starts using another store (e.g. an
# Embed run of another tiling) or an Embed run of its store ends, so that every widget's store
# line says which store is in use and how far it is.
STORE_CHANGED = SignalInstance((str,))


def session_for(ref: SlideRef) -> SlideSession:
    """The session of ``ref``'s slide content (created on first use)."""
    session = _SESSIONS.get(ref.fingerprint)
    if session is None:
        session = _SESSIONS[ref.fingerprint] = SlideSession(ref)
    else:
        session.ref = ref  # the layer may have moved, or the same file was reopened
    return session


def reset_sessions() -> None:
    """Forget every session (a new viewer in the same process starts clean)."""
    _SESSIONS.clear()


# ----------------------------------------------------------------------------- ROIs
def ellipse_polygon(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """An ellipse given by its 4 bounding-box corners (napari's ellipse data) as ``n`` points."""
    c = np.asarray(corners, dtype=np.float64)
    centre = c.mean(axis=0)
    half_a = (c[1] - c[0]) / 2.0
    half_b = (c[3] - c[0]) / 2.0
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return centre + np.outer(np.cos(t), half_a) + np.outer(np.sin(t), half_b)


AREA_SHAPES = ("rectangle", "polygon", "ellipse")


def world_transform(state: Mapping | Any):
    """Data -> world mapping of a layer, from the layer or from its writer ``meta`` dict.

    Works on ``(N, D)`` arrays (napari's ``data_to_world`` takes one point at a time).
    """
    from napari.utils.transforms import Affine, CompositeAffine

    def get(key: str):
        return state[key] if isinstance(state, Mapping) else getattr(state, key)

    data2physical = CompositeAffine(
        scale=get("scale"), translate=get("translate"), rotate=get("rotate"), shear=get("shear")
    )
    affine = get("affine")
    matrix = affine.affine_matrix if hasattr(affine, "affine_matrix") else np.asarray(affine)
    physical2world = Affine(affine_matrix=matrix)

    def apply(data: np.ndarray) -> np.ndarray:
        return np.asarray(physical2world(data2physical(np.asarray(data, dtype=np.float64))))

    return apply


def shape_world_outline(kind: str, data: np.ndarray, to_world) -> np.ndarray | None:
    """World ``(y, x)`` outline of one shape (ellipses sampled); None for lines and paths."""
    if kind not in AREA_SHAPES:
        return None
    pts = np.asarray(data, dtype=np.float64)
    if kind == "ellipse":
        pts = ellipse_polygon(pts[:, -2:])
    return to_world(pts)[:, -2:]


def shape_level0_polygons(layer: Any, ref: SlideRef, indices: list[int] | None = None) -> list:
    """``[(shape index, (M, 2) level-0 xy polygon or None)]`` for shapes of a Shapes layer."""
    to_world = world_transform(layer)
    idx = range(len(layer.data)) if indices is None else indices
    out = []
    for i in idx:
        world = shape_world_outline(layer.shape_type[i], layer.data[i], to_world)
        out.append((i, None if world is None else ref.world_to_level0(world)))
    return out


def points_level0(layer: Any, ref: SlideRef, indices: list[int] | None = None) -> np.ndarray:
    """Level-0 ``(x, y)`` of points of a Points layer (all, or ``indices``)."""
    data = np.asarray(layer.data, dtype=np.float64)
    if indices is not None:
        data = data[list(indices)]
    if len(data) == 0:
        return np.zeros((0, 2))
    return ref.world_to_level0(world_transform(layer)(data)[:, -2:])
