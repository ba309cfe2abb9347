"""Corpus manifests: the sources YAML, slide manifests and tile manifests.

* ``sources.yaml`` (see ``src-manifest/``): the datasets of the GPFM corpus with their counts;
  :func:`load_sources` validates it against the schema and checks that its totals are the sums.
* A **slide manifest** CSV lists slides to tile: ``slide_path, mpp, n_tiles, spec_id, source,
  organ, split`` (``mpp`` empty = the slide's own pixel size). :func:`build_slide_manifest` makes
  one from folders of slides.
* A **tile manifest** CSV lists tiles: ``slide_path, x, y, tile_size_l0, mpp, read_size``.

Every problem is a :class:`~napari_gpfm.errors.ConfigError` naming the file, the row (CSV line, or
YAML line and column) and the column or field. Relative slide paths are relative to ``root``,
by default the current directory (the example manifest is relative to the repository root).

The schema is checked by a small validator for the JSON-Schema keywords
:mod:`gpfm_train.data.schema` uses (no extra dependency).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

from gpfm_train.data.schema import SCHEMA
from napari_gpfm.errors import ConfigError, GPFMError

_log = logging.getLogger(__name__)

SLIDE_COLUMNS = ("slide_path", "mpp", "n_tiles", "spec_id", "source", "organ", "split")
TILE_COLUMNS = ("slide_path", "x", "y", "tile_size_l0", "mpp", "read_size")
SPLITS = ("train", "val", "test", "exclude")

# ---------------------------------------------------------------------------- schema checking

_ANNOTATIONS = {"$schema", "$id", "title", "description", "$defs"}
SUPPORTED_KEYWORDS = {
    "$ref",
    "type",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "pattern",
} | _ANNOTATIONS


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"unsupported schema type {name!r}")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def schema_errors(
    instance: Any, schema: dict[str, Any], path: tuple = ()
) -> list[tuple[tuple, str]]:
    """``(path, problem)`` for everything in ``instance`` that breaks ``schema`` (JSON Schema).

    ``path`` elements are mapping keys and list indices. Only the keywords in
    :data:`SUPPORTED_KEYWORDS` are used; ``$ref`` resolves ``#/$defs/...`` in :data:`SCHEMA`.
    """
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        return schema_errors(instance, SCHEMA["$defs"][ref.split("/")[-1]], path)
    errors: list[tuple[tuple, str]] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(instance, n) for n in names):
            want = " or ".join(
                "empty" if n == "null" else f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names
            )
            return [(path, f"must be {want}, got {_describe(instance)}")]
    if "enum" in schema and instance not in schema["enum"]:
        options = ", ".join(str(v) for v in schema["enum"])
        errors.append((path, f"must be one of {options}, got {_describe(instance)}"))
    if _is_type(instance, "number"):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append((path, f"must be at least {schema['minimum']}, got {instance}"))
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append((path, f"must be at most {schema['maximum']}, got {instance}"))
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append((path, f"must be above {schema['exclusiveMinimum']}, got {instance}"))
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            errors.append((path, "must not be empty"))
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append((path, f"{_describe(instance)} does not match {schema['pattern']}"))
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            if key not in instance:
                errors.append(((*path, key), "is missing"))
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errors.extend(schema_errors(value, props[key], (*path, key)))
            elif schema.get("additionalProperties", True) is False:
                allowed = ", ".join(props)
                errors.append(((*path, key), f"is not a known field (known: {allowed})"))
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append((path, f"needs at least {schema['minItems']} item(s)"))
        if "items" in schema:
            for i, item in enumerate(instance):
                errors.extend(schema_errors(item, schema["items"], (*path, i)))
    return errors


def _path_text(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


# ---------------------------------------------------------------------------- sources.yaml


@dataclass(frozen=True)
class SourceRecord:
    """One dataset of the pretraining corpus (a row of GPFM's data.xlsx)."""

    name: str
    folder: str
    organ: str
    slides: int
    patches: int
    modality: str
    url: str
    url_source: str
    access: str
    licence: str
    citation: str
    notes: str = ""


@dataclass(frozen=True)
class SourcesFile:
    """A validated sources file: its records and declared totals."""

    path: Path
    title: str
    records: tuple[SourceRecord, ...]
    totals: dict[str, int]
    tile: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def total_patches(self) -> int:
        return sum(r.patches for r in self.records)

    @property
    def total_slides(self) -> int:
        return sum(r.slides for r in self.records)

    def by_organ(self) -> dict[str, int]:
        """Patches per organ, largest first."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.organ] = out.get(r.organ, 0) + r.patches
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _yaml_position(root_node: Any, path: tuple) -> tuple[int, int] | None:
    """(line, column), 1-based, of the YAML node at ``path`` (or of its nearest parent)."""
    import yaml

    if root_node is None:
        return None
    node, mark = root_node, root_node.start_mark
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if getattr(k, "value", None) == key]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            match = node.value[key : key + 1]
        else:
            match = []
        if not match:
            break
        node, mark = match[0], match[0].start_mark
    return mark.line + 1, mark.column + 1


def _yaml_error(path: Path, data: Any, root_node: Any, where: tuple, problem: str) -> str:
    pos = _yaml_position(root_node, where)
    loc = f"line {pos[0]}, column {pos[1]}" if pos else "top level"
    label = _path_text(where)
    if len(where) >= 2 and where[0] == "sources" and isinstance(where[1], int):
        with contextlib.suppress(KeyError, IndexError, TypeError):
            label += f" ({data['sources'][where[1]]['name']})"
    return f"{path}: {loc}: {label} {problem}"


def load_sources(path: str | os.PathLike) -> SourcesFile:
    """Load and validate a sources YAML; its totals must equal the sums of its records."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"sources file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}: not valid YAML ({problem}); fix the syntax") from None
    if data is None:
        raise ConfigError(f"{path} is empty; it must list the corpus sources")
    problems = schema_errors(data, SCHEMA["$defs"]["sources"])
    if not problems:
        problems = _sources_consistency(data)
    if problems:
        where, problem = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(_yaml_error(path, data, root_node, where, problem) + more)
    records = tuple(SourceRecord(**rec) for rec in data["sources"])
    return SourcesFile(
        path=path,
        title=data["title"],
        records=records,
        totals=dict(data["totals"]),
        tile=dict(data["tile"]),
        provenance=dict(data["provenance"]),
    )


def _sources_consistency(data: dict) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    seen: dict[tuple[str, str], int] = {}
    for i, rec in enumerate(data["sources"]):
        for key in ("name", "folder"):
            first = seen.setdefault((key, rec[key]), i)
            if first != i:
                problems.append((("sources", i, key), f"repeats sources[{first}]'s {key}"))
        if (rec["modality"] == "WSI") != (rec["slides"] > 0):
            problems.append(
                (("sources", i, "modality"), f"is {rec['modality']} but slides={rec['slides']}")
            )
    sums = {
        "sources": len(data["sources"]),
        "slides": sum(r["slides"] for r in data["sources"]),
        "patches": sum(r["patches"] for r in data["sources"]),
    }
    for key, total in sums.items():
        if data["totals"][key] != total:
            problems.append(
                (("totals", key), f"is {data['totals'][key]:,} but the sources sum to {total:,}")
            )
    return problems


# ---------------------------------------------------------------------------- CSV manifests


@dataclass(frozen=True)
class SlideRow:
    """A slide manifest row. ``mpp`` overrides the slide's level-0 pixel size when set."""

    slide_path: str
    mpp: float | None
    n_tiles: int
    spec_id: str
    source: str | None = None
    organ: str | None = None
    split: str = "train"


@dataclass(frozen=True)
class TileRow:
    """A tile manifest row: a ``tile_size_l0`` level-0 square at ``(x, y)`` read at ``mpp``."""

    slide_path: str
    x: int
    y: int
    tile_size_l0: float
    mpp: float
    read_size: int

    @property
    def slide_mpp(self) -> float:
        """The level-0 pixel size this row implies: ``mpp * read_size / tile_size_l0``."""
        return self.mpp * self.read_size / self.tile_size_l0


def resolve_slide_path(slide_path: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """An absolute path: ``slide_path`` itself, or ``root`` (default: cwd) / ``slide_path``."""
    p = Path(slide_path).expanduser()
    if p.is_absolute():
        return p
    return (Path(root).expanduser() if root is not None else Path.cwd()) / p


def _convert_cell(text: str, prop: dict[str, Any]) -> Any:
    """A CSV cell as the schema's type; raises ValueError with the problem."""
    types = [prop["type"]] if isinstance(prop["type"], str) else list(prop["type"])
    text = text.strip()
    if text == "":
        if "null" in types:
            return None
        if "string" in types:
            return ""
        raise ValueError("is empty")
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            if "number" not in types:
                raise ValueError(f"must be a whole number, got {_describe(text)}") from None
    if "number" in types:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a number, got {_describe(text)}") from None
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {_describe(text)}")
        return value
    return text


def _read_csv(
    path: Path, columns: Sequence[str], schema_name: str
) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` pairs of a validated CSV whose header has exactly ``columns``."""
    schema = SCHEMA["$defs"][schema_name]
    if not path.is_file():
        raise ConfigError(f"manifest not found: {path}")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = None
        for raw in reader:
            if any(cell.strip() for cell in raw):
                header = [cell.strip() for cell in raw]
                break
        if header is None:
            raise ConfigError(
                f"{path} is empty: a manifest needs the header line {','.join(columns)} and rows"
            )
        header_line = reader.line_num
        missing = [c for c in columns if c not in header]
        unknown = [c for c in header if c not in columns]
        if missing or unknown or len(set(header)) != len(header):
            problem = (
                f"misses column(s) {', '.join(missing)}"
                if missing
                else f"has unknown column(s) {', '.join(unknown)}"
                if unknown
                else "repeats a column"
            )
            raise ConfigError(
                f"{path}: line {header_line}: the header {problem}; expected {','.join(columns)}"
            )
        rows: list[tuple[int, dict[str, Any]]] = []
        for raw in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in raw):
                continue
            if len(raw) != len(header):
                raise ConfigError(
                    f"{path}: line {line}: has {len(raw)} cells but the header has {len(header)}"
                )
            row: dict[str, Any] = {}
            for name, cell in zip(header, raw, strict=True):
                try:
                    row[name] = _convert_cell(cell, schema["properties"][name])
                except ValueError as exc:
                    raise ConfigError(f"{path}: line {line}, column '{name}': {exc}") from None
            problems = schema_errors(row, schema)
            if problems:
                where, problem = problems[0]
                raise ConfigError(f"{path}: line {line}, column '{_path_text(where)}': {problem}")
            rows.append((line, row))
    if not rows:
        raise ConfigError(f"{path} lists no rows (only a header); a manifest needs at least one")
    return rows


def load_slide_manifest(path: str | os.PathLike) -> list[SlideRow]:
    """Read and validate a slide manifest CSV (a slide may appear only once)."""
    path = Path(path).expanduser()
    seen: dict[str, int] = {}
    out = []
    for line, row in _read_csv(path, SLIDE_COLUMNS, "slide_row"):
        first = seen.setdefault(row["slide_path"], line)
        if first != line:
            raise ConfigError(
                f"{path}: line {line}, column 'slide_path': {row['slide_path']} is already "
                f"listed on line {first}"
            )
        out.append(SlideRow(**row))
    return out


def load_tile_manifest(path: str | os.PathLike) -> list[TileRow]:
    """Read and validate a tile manifest CSV.

    The rows of one slide must imply one level-0 pixel size (``mpp * read_size / tile_size_l0``,
    1% tolerance): the tiles are then read from a consistently calibrated slide.
    """
    path = Path(path).expanduser()
    implied: dict[str, tuple[int, float]] = {}
    out = []
    for line, row in _read_csv(path, TILE_COLUMNS, "tile_row"):
        tile = TileRow(**row)
        first_line, first_mpp = implied.setdefault(tile.slide_path, (line, tile.slide_mpp))
        if abs(tile.slide_mpp / first_mpp - 1) > 0.01:
            raise ConfigError(
                f"{path}: line {line}, column 'tile_size_l0': this row implies a level-0 pixel size "
                f"of {tile.slide_mpp:.4g} um/px for {tile.slide_path} but line {first_line} "
                f"implies {first_mpp:.4g}; use one calibration per slide"
            )
        out.append(tile)
    return out


def manifest_kind(path: str | os.PathLike) -> str:
    """``"sources"``, ``"slides"`` or ``"tiles"`` from the file's suffix and CSV header."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        return "sources"
    if not path.is_file():
        raise ConfigError(f"manifest not found: {path}")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for raw in csv.reader(fh):
            cells = {c.strip() for c in raw if c.strip()}
            if not cells:
                continue
            if "n_tiles" in cells or "spec_id" in cells:
                return "slides"
            if {"x", "y"} <= cells:
                return "tiles"
            break
    raise ConfigError(
        f"{path}: cannot tell what manifest this is: a slide manifest's header is "
        f"{','.join(SLIDE_COLUMNS)}, a tile manifest's {','.join(TILE_COLUMNS)}, and sources "
        "files end in .yaml"
    )


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def write_manifest(rows: Sequence[SlideRow] | Sequence[TileRow], out: str | os.PathLike) -> Path:
    """Write slide or tile rows as CSV atomically (a temporary file, then ``os.replace``)."""
    if not rows:
        raise ConfigError(f"refusing to write {out}: there are no rows to write")
    kind = type(rows[0])
    if kind not in (SlideRow, TileRow) or any(type(r) is not kind for r in rows):
        raise ConfigError("a manifest holds only SlideRow or only TileRow rows")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow([f.name for f in fields(kind)])
            for row in rows:
                writer.writerow([_format_cell(v) for v in astuple(row)])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# ---------------------------------------------------------------------------- building


@dataclass
class SlideManifestBuild:
    """What :func:`build_slide_manifest` found: rows, and the slides it skipped and why."""

    rows: list[SlideRow]
    skipped: list[tuple[str, str]]
    spec_id: str

    @property
    def n_tiles(self) -> int:
        return sum(r.n_tiles for r in self.rows)

    def summary(self) -> str:
        lines = [
            f"{len(self.rows)} slide(s), {self.n_tiles:,} tissue tile(s), spec {self.spec_id}; "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  {r.slide_path}: {r.n_tiles} tiles" for r in self.rows]
        lines += [f"  skipped {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def find_slides(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Slide files under ``paths`` (folders searched recursively; files taken as given), sorted."""
    from napari_gpfm.slides import SLIDE_SUFFIXES

    found: set[Path] = set()
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            for dirpath, _dirs, files in os.walk(p):
                for name in files:
                    if name.lower().endswith(SLIDE_SUFFIXES) and not name.startswith("."):
                        found.add(Path(dirpath) / name)
        elif p.is_file():
            found.add(p)
        else:
            raise ConfigError(f"{p} does not exist; pass folders of slides or slide files")
    return sorted(found, key=lambda q: str(q))


def _manifest_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when under it (POSIX separators), else absolute."""
    absolute = path.resolve()
    try:
        return absolute.relative_to(root.resolve()).as_posix()
    except ValueError:
        return absolute.as_posix()


def build_slide_manifest(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    spec: Any = None,
    *,
    default_mpp: float | None = None,
    root: str | os.PathLike | None = None,
    source: str | None = None,
    organ: str | None = None,
    split: str = "train",
    progress: Callable[[int, int, Path], None] | None = None,
) -> SlideManifestBuild:
    """Open every slide under ``paths``, detect tissue and count the kept tiles of ``spec``.

    A slide that fails to open or tile is skipped with its reason, never fatal. A slide with no
    pixel size in its file is tiled at ``default_mpp`` (recorded in its ``mpp`` column) or, when
    that is None, skipped. Slides without a single tissue tile are skipped too, and so is a
    copy of a slide already listed (same content fingerprint): its tiles would count twice.

    Args:
        paths: folders (searched recursively for slide files) and/or slide files.
        spec: a ``napari_gpfm.tiling.TilingSpec`` (default ``TilingSpec()``).
        default_mpp: level-0 um/px for slides that do not record one.
        root: slide paths under it are written relative to it (default: the current directory).
        source, organ, split: copied into every row.
        progress: called as ``progress(i, n, path)`` before each slide.
    """
    from napari_gpfm.slides import open_slide
    from napari_gpfm.slides.slide import file_fingerprint
    from napari_gpfm.tiling import TilingSpec, make_grid

    spec = spec or TilingSpec()
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    slides = find_slides(paths)
    root_path = Path(root).expanduser() if root is not None else Path.cwd()
    rows: list[SlideRow] = []
    skipped: list[tuple[str, str]] = []
    listed: dict[str, str] = {}  # content fingerprint -> the manifest path listing it
    for i, path in enumerate(slides):
        if progress is not None:
            progress(i, len(slides), path)
        shown = _manifest_path(path, root_path)
        try:
            fingerprint = file_fingerprint(path)
            if fingerprint in listed:
                skipped.append((shown, f"the same slide as {listed[fingerprint]} (identical "
                                       "content), listed once"))
                continue
            override = None
            with open_slide(path) as slide:
                has_mpp = slide.has_mpp
                if has_mpp:
                    grid = make_grid(slide, spec)
            if not has_mpp:
                if default_mpp is None:
                    skipped.append(
                        (shown, "no pixel size in the file; pass --default-mpp to tile it")
                    )
                    continue
                override = float(default_mpp)
                with open_slide(path, mpp=override) as slide:
                    grid = make_grid(slide, spec)
        except GPFMError as exc:
            skipped.append((shown, str(exc)))
            continue
        except Exception as exc:  # a damaged file must not stop a scan of thousands of slides
            _log.debug("tiling %s failed", path, exc_info=True)
            skipped.append((shown, f"{type(exc).__name__}: {exc}"))
            continue
        if len(grid) == 0:
            skipped.append(
                (
                    shown,
                    f"no tile has at least {spec.min_tissue:g} tissue ({grid.candidates} tried)",
                )
            )
            continue
        listed[fingerprint] = shown
        rows.append(SlideRow(shown, override, len(grid), spec.id, source, organ, split))
    return SlideManifestBuild(rows=rows, skipped=skipped, spec_id=spec.id)


def validate_manifest_file(
    path: str | os.PathLike, root: str | os.PathLike | None = None, check_files: bool = False
) -> str:
    """Validate a sources YAML or a slide/tile manifest; returns a one-paragraph summary.

    ``check_files`` also checks that every listed slide file exists (relative paths from
    ``root``, default the current directory).
    """
    path = Path(path).expanduser()
    kind = manifest_kind(path)
    if kind == "sources":
        src = load_sources(path)
        organs = src.by_organ()
        top = ", ".join(f"{k} {v:,}" for k, v in list(organs.items())[:5])
        return (
            f"{path}: valid sources file: {len(src.records)} sources, {src.total_slides:,} slides, "
            f"{src.total_patches:,} patches (totals match); {len(organs)} organs, largest: {top}"
        )
    rows: Sequence[SlideRow] | Sequence[TileRow]
    if kind == "slides":
        rows = load_slide_manifest(path)
        detail = (
            f"{len(rows)} slides, {sum(r.n_tiles for r in rows):,} tiles, "
            f"spec id(s) {', '.join(sorted({r.spec_id for r in rows}))}"
        )
    else:
        rows = load_tile_manifest(path)
        detail = f"{len(rows):,} tiles from {len({r.slide_path for r in rows})} slides"
    if check_files:
        for row in rows:
            if not resolve_slide_path(row.slide_path, root).is_file():
                raise ConfigError(
                    f"{path}: slide {row.slide_path} not found under "
                    f"{Path(root) if root is not None else Path.cwd()}; pass --root"
                )
    return f"{path}: valid {kind[:-1]} manifest: {detail}"
