"""`gpfm models`: the registered encoders, their weights files, sizes and licences."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the encoders, whether their weights were found, embed size and licence",
        description="List the registered encoders. Weights are looked up in --models-dir, "
        "else $GPFM_MODELS_DIR, else ~/.cache/napari-gpfm/models; nothing is downloaded. "
        "Any timm architecture can also be used as timm:<name> with --weights.",
    )
    p.add_argument("--models-dir", default=None, help="folder searched for weights files")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def model_rows(models_dir: str | None = None) -> list[dict]:
    """One dict per registry entry: name, title, embed_dim, input_size, mpp, weights, licence."""
    from napari_gpfm.encoders import get_spec, model_table
    from napari_gpfm.errors import GPFMError

    rows = []
    for status in model_table(models_dir):
        try:
            spec = get_spec(status.name)
        except GPFMError:  # the embedded default before it is built
            spec = None
        rows.append({
            "name": status.name,
            "title": status.display_name,
            "embed_dim": spec.embed_dim if spec else None,
            "input_size": spec.input_size if spec else None,
            "mpp": spec.native_mpp if spec else None,
            "read_size": spec.native_read_size if spec else None,
            "weights": str(status.weights) if status.weights else None,
            "licence": status.licence,
            "url": status.url,
            "note": status.note,
        })
    return rows


def run(args) -> int:
    from napari_gpfm.encoders import models_dir

    rows = model_rows(args.models_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ("name", "dim", "tile", "weights", "licence")
    table = []
    for r in rows:
        tile = f"{r['read_size']} px @ {r['mpp']:g}" if r["read_size"] else "-"
        table.append((r["name"], str(r["embed_dim"] or "-"), tile, r["weights"] or "not found",
                      r["licence"] or "-"))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()
    missing = [r for r in rows if not r["weights"]]
    for r in missing:
        if r["note"]:
            print(f"{r['name']}: {r['note']}")
    print(f"models folder: {models_dir(args.models_dir)}; any timm architecture also works as "
          "timm:<name> --weights FILE")
    return 0
