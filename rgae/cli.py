"""The ``rgae`` command line. Subcommands live in :mod:`rgae.commands`, one module each, with
``add_parser(subparsers)`` registering an argparse parser whose ``func`` runs the job."""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under rgae.commands, in the order they appear in --help.
COMMANDS = ("demo", "explain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgae",
        description="Explain where a LLaVA-style multimodal LLM looks (R-GAE relevance maps and baselines).",
    )
    from rgae import __version__

    parser.add_argument("--version", action="version", version=f"rgae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rgae.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rgae.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
