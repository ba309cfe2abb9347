"""The JSON Schema of the corpus manifests (``src-manifest/schema.json`` is this, dumped).

Kept as Python data so that an installed package validates without the repository checkout;
``tests/train/test_manifests.py`` checks that the JSON file in ``src-manifest/`` is identical.
Three documents share it: ``sources.yaml`` validates against ``#/$defs/sources``; each row of a
slide or tile manifest CSV, its cells converted to the declared types, against
``#/$defs/slide_row`` or ``#/$defs/tile_row``.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "GPFM pretraining corpus: sources, slide manifests, tile manifests",
    "description": "Three documents share this file. sources.yaml validates against "
    "#/$defs/sources. A slide or tile manifest is a CSV whose header names the "
    "columns; each row, with its cells converted to the types below (an empty cell "
    "is null), validates against #/$defs/slide_row or #/$defs/tile_row.",
    "$defs": {
        "sources": {
            "type": "object",
            "required": ["schema_version", "title", "provenance", "tile", "totals", "sources"],
            "additionalProperties": False,
            "properties": {
                "schema_version": {"type": "integer", "enum": [1]},
                "title": {"type": "string", "minLength": 1},
                "provenance": {
                    "type": "object",
                    "required": ["table", "urls", "note"],
                    "additionalProperties": False,
                    "properties": {
                        "table": {"type": "string", "minLength": 1},
                        "urls": {"type": "string", "minLength": 1},
                        "note": {"type": "string", "minLength": 1},
                        "counting": {"type": "string", "minLength": 1},
                    },
                },
                "tile": {
                    "type": "object",
                    "required": ["size_px", "level", "format"],
                    "additionalProperties": False,
                    "properties": {
                        "size_px": {"type": "integer", "minimum": 1},
                        "level": {"type": "integer", "minimum": 0},
                        "format": {"type": "string", "minLength": 1},
                    },
                },
                "totals": {
                    "type": "object",
                    "required": ["sources", "slides", "patches"],
                    "additionalProperties": False,
                    "properties": {
                        "sources": {"type": "integer", "minimum": 1},
                        "slides": {"type": "integer", "minimum": 0},
                        "patches": {"type": "integer", "minimum": 1},
                    },
                },
                "sources": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/source"}},
            },
        },
        "source": {
            "type": "object",
            "required": [
                "name",
                "folder",
                "organ",
                "slides",
                "patches",
                "modality",
                "url",
                "url_source",
                "access",
                "licence",
                "citation",
            ],
            "additionalProperties": False,
            "properties": {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "description": "dataset name as the GPFM note writes it",
                },
                "folder": {
                    "type": "string",
                    "pattern": "^[A-Za-z0-9_.-]+$",
                    "description": "the patch folder name in GPFM's data.xlsx (its row key)",
                },
                "organ": {
                    "type": "string",
                    "minLength": 1,
                    "description": "organ or tissue; 'multiple' for pan-organ sets",
                },
                "slides": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "slides listed by data.xlsx; 0 for image (non-WSI) sets",
                },
                "patches": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "512 x 512 level-0 patches GPFM cut",
                },
                "modality": {
                    "type": "string",
                    "enum": ["WSI", "ROI"],
                    "description": "WSI when data.xlsx counts "
                    "slides, ROI when it lists 0 "
                    "(image/region sets)",
                },
                "url": {"type": "string", "pattern": "^(https?://\\S+|unknown)$"},
                "url_source": {
                    "type": "string",
                    "minLength": 1,
                    "description": "where the url comes from",
                },
                "access": {
                    "type": "string",
                    "minLength": 1,
                    "description": "how the data are obtained, or 'unknown'",
                },
                "licence": {
                    "type": "string",
                    "minLength": 1,
                    "description": "licence of the images, or 'unknown'",
                },
                "citation": {
                    "type": "string",
                    "minLength": 1,
                    "description": "reference to cite, or 'unknown'",
                },
                "notes": {"type": "string"},
            },
        },
        "slide_row": {
            "type": "object",
            "required": ["slide_path", "mpp", "n_tiles", "spec_id", "source", "organ", "split"],
            "additionalProperties": False,
            "properties": {
                "slide_path": {
                    "type": "string",
                    "minLength": 1,
                    "description": "absolute, or relative to the manifest root",
                },
                "mpp": {
                    "type": ["number", "null"],
                    "minimum": 0.01,
                    "maximum": 100,
                    "description": "level-0 um/px override; empty = from the slide's metadata",
                },
                "n_tiles": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "tissue tiles of the spec",
                },
                "spec_id": {
                    "type": "string",
                    "pattern": "^[0-9a-f]{12}$",
                    "description": "napari_gpfm TilingSpec.id",
                },
                "source": {"type": ["string", "null"]},
                "organ": {"type": ["string", "null"]},
                "split": {"type": "string", "enum": ["train", "val", "test", "exclude"]},
            },
        },
        "tile_row": {
            "type": "object",
            "required": ["slide_path", "x", "y", "tile_size_l0", "mpp", "read_size"],
            "additionalProperties": False,
            "properties": {
                "slide_path": {"type": "string", "minLength": 1},
                "x": {"type": "integer", "minimum": 0, "description": "level-0 left"},
                "y": {"type": "integer", "minimum": 0, "description": "level-0 top"},
                "tile_size_l0": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "level-0 px per tile side",
                },
                "mpp": {
                    "type": "number",
                    "minimum": 0.01,
                    "maximum": 100,
                    "description": "um/px at which the tile is read",
                },
                "read_size": {
                    "type": "integer",
                    "minimum": 8,
                    "maximum": 8192,
                    "description": "tile side in px at mpp",
                },
            },
        },
    },
}


def schema_json() -> str:
    """The schema as the text of ``src-manifest/schema.json``."""
    return json.dumps(SCHEMA, indent=2, ensure_ascii=False) + "\n"
