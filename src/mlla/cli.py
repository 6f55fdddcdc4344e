"""The ``mlla`` command. Each subcommand lives in :mod:`mlla.commands` as a module with
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from . import commands

__all__ = ["build_parser", "configure_logging", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlla",
        description="Mamba-Like Linear Attention vision models: list, train, validate, benchmark, export.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, also from other libraries")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(subparsers)
    return parser


def configure_logging(verbose: bool = False) -> None:
    """Our messages (the ``mlla`` logger) at INFO, other libraries' only from WARNING on
    (onnxscript, onnx_ir and others log hundreds of INFO lines); ``verbose``: everything at DEBUG."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("mlla").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        with logging_redirect_tqdm():  # a message while a progress bar runs gets its own line above the bar
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"mlla {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
