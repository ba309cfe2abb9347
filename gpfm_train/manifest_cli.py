"""``gpfm-train manifest build|validate``: make and check corpus manifests.

``gpfm-train manifest build DIR [DIR|SLIDE ...] --out slides.csv`` tiles every slide found (tissue
detection, tiling spec from ``--mpp/--size/--min-tissue``), writes the slide manifest atomically
and prints what it kept and skipped. ``gpfm-train manifest validate FILE`` checks a sources YAML
or a slide/tile manifest CSV.

The ``gpfm-train`` entry point calls :func:`add_manifest_commands` on its subparsers; each
command stores its handler as ``args.func`` (``args.func(args) -> exit code``). Until then,
``python -m gpfm_train.manifest_cli ...`` runs the same commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_gpfm.errors import ConfigError, GPFMError, ParameterError


def add_manifest_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``manifest build`` and ``manifest validate`` to ``subparsers``; returns ``manifest``."""
    from gpfm_train.data.manifests import SPLITS

    manifest = subparsers.add_parser(
        "manifest",
        help="build or validate pretraining corpus manifests",
        description="Build a slide manifest from folders of slides, or validate a manifest.",
    )
    commands = manifest.add_subparsers(dest="manifest_command", metavar="{build,validate}")
    commands.required = True

    build = commands.add_parser(
        "build",
        help="tile slides and write a slide manifest CSV",
        description="Open every slide under the given folders (recursively) or files, detect "
        "tissue, count the tissue tiles of the tiling spec, and write a slide manifest. A slide "
        "that fails to open is reported and skipped.",
    )
    build.add_argument("paths", nargs="+", metavar="DIR", help="folders of slides, or slide files")
    build.add_argument("--out", required=True, help="the slide manifest CSV to write")
    build.add_argument("--mpp", type=float, default=0.5, help="tile resolution in um/px (0.5)")
    build.add_argument("--size", type=int, default=224, help="tile side in pixels at --mpp (224)")
    build.add_argument(
        "--min-tissue", type=float, default=0.5, help="keep tiles with this tissue fraction (0.5)"
    )
    build.add_argument(
        "--default-mpp",
        type=float,
        default=None,
        help="level-0 um/px for slides whose file records none (recorded in the mpp column); "
        "without it such slides are skipped",
    )
    build.add_argument(
        "--root",
        default=None,
        help="write slide paths relative to this folder (default: the current directory)",
    )
    build.add_argument("--source", default=None, help="source dataset name for every row")
    build.add_argument("--organ", default=None, help="organ for every row")
    build.add_argument("--split", default="train", choices=SPLITS, help="split for every row")
    build.add_argument("--quiet", action="store_true", help="no per-slide progress on stderr")
    build.set_defaults(func=run_build)

    validate = commands.add_parser(
        "validate",
        help="validate a sources YAML or a slide/tile manifest CSV",
        description="Check a sources YAML against the schema (and that its totals are the sums) "
        "or a slide/tile manifest CSV row by row.",
    )
    validate.add_argument("file", help="sources .yaml, or a slide/tile manifest .csv")
    validate.add_argument(
        "--root", default=None, help="base of relative slide paths (default: current directory)"
    )
    validate.add_argument(
        "--check-files", action="store_true", help="also check that every slide file exists"
    )
    validate.set_defaults(func=run_validate)
    return manifest


def _tiling_spec(args: argparse.Namespace):
    from napari_gpfm.tiling import TilingSpec

    if not 8 <= args.size <= 8192:
        raise ParameterError(f"--size {args.size}: the tile side must be 8-8192 pixels")
    if args.default_mpp is not None and not 0.01 <= args.default_mpp <= 100:
        raise ParameterError(f"--default-mpp {args.default_mpp}: must be 0.01-100 um/px")
    return TilingSpec(
        mpp=args.mpp, read_size=args.size, model_size=args.size, min_tissue=args.min_tissue
    )


def run_build(args: argparse.Namespace) -> int:
    """``manifest build``: tile the slides, write the CSV atomically, print a summary."""
    from gpfm_train.data.manifests import build_slide_manifest, write_manifest
    from napari_gpfm.analysis._io import prepare_output_path

    spec = _tiling_spec(args)
    prepare_output_path(args.out, "the manifest")  # before tiling a whole cohort, not after

    def progress(i: int, n: int, path: Path) -> None:
        if not args.quiet:
            print(f"[{i + 1}/{n}] {path}", file=sys.stderr, flush=True)

    result = build_slide_manifest(
        args.paths,
        spec,
        default_mpp=args.default_mpp,
        root=args.root,
        source=args.source,
        organ=args.organ,
        split=args.split,
        progress=progress,
    )
    if not result.rows:
        if not result.skipped:
            raise ConfigError(
                f"no slide files under {', '.join(args.paths)}; nothing written to {args.out}"
            )
        first_path, why = result.skipped[0]
        raise ConfigError(
            f"none of the {len(result.skipped)} slide(s) could be tiled (first: {first_path}: "
            f"{why}); nothing written to {args.out}"
        )
    out = write_manifest(result.rows, args.out)
    print(result.summary())
    print(f"wrote {out}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """``manifest validate``: print the summary of a valid file (errors raise ConfigError)."""
    from gpfm_train.data.manifests import validate_manifest_file

    print(validate_manifest_file(args.file, root=args.root, check_files=args.check_files))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the manifest commands on their own (``python -m gpfm_train.manifest_cli``)."""
    parser = argparse.ArgumentParser(prog="gpfm-train")
    commands = parser.add_subparsers(dest="command", metavar="manifest")
    commands.required = True
    add_manifest_commands(commands)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GPFMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
