"""The ``deco`` command line. Subcommands live in :mod:`deco_models.commands`, one module each."""

from __future__ import annotations

import sys

from deco_models.cli_base import build_parser as _build_parser
from deco_models.cli_base import run

COMMANDS = ("train", "eval", "generate", "convert", "zoo")


def build_parser():
    from deco_models import __version__

    return _build_parser(
        "deco",
        "Train, evaluate, run and convert the DeCo projector-comparison MLLMs.",
        __version__,
        "deco_models.commands",
        COMMANDS,
    )


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
