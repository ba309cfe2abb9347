"""`gpfm`: the command-line face of napari-gpfm.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module adds its
parser and sets ``func`` to a handler ``(args) -> int``. Errors the user can cause
(:class:`~napari_gpfm.errors.GPFMError`) become one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from napari_gpfm import __version__
from napari_gpfm.errors import GPFMError, describe_os_error

# Order is the order of `gpfm --help`.
SUBCOMMANDS = (
    "info",
    "tiles",
    "models",
    "embed",
    "heatmap",
    "classify",
    "index",
    "eval",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpfm",
        description="Whole-slide images through a pathology foundation model: "
        "tissue tiling, embeddings, maps, similarity search and ROI classification.",
    )
    parser.add_argument("--version", action="version", version=f"napari-gpfm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"napari_gpfm.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"napari_gpfm.cli.{name}":
                continue  # a subcommand not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GPFMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `gpfm ... | head`: the reader left; nothing more to say
        sys.stderr.close()
        return 0
    except OSError as exc:  # the file system refused something the checks let through
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return GPFMError.exit_code
    except KeyboardInterrupt:
        # What survives depends on the command (commands that resume set their own line).
        print(getattr(args, "interrupted", "interrupted"), file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
