"""Shared plumbing of the ``deco`` and ``rgae`` command lines: subcommands are modules with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib


def build_parser(prog: str, description: str, version: str, package: str, commands: tuple[str, ...]):
    """An argparse parser whose subcommands are the modules ``{package}.{name}`` for ``name`` in ``commands``;
    each module's ``add_parser(subparsers)`` registers its parser and sets ``func``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands:
        # "explain-dataset" lives in the module explain_dataset.
        importlib.import_module(f"{package}.{name.replace('-', '_')}").add_parser(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand (help when none is given); returns the exit code."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)
