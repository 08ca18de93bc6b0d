"""The ``rgae`` command line. Subcommands live in :mod:`rgae.commands`, one module each."""

from __future__ import annotations

import sys

from rgae.cli_base import build_parser as _build_parser
from rgae.cli_base import run

COMMANDS = ("demo", "explain", "explain-dataset", "evaluate", "explore")


def build_parser():
    from rgae import __version__

    return _build_parser(
        "rgae",
        "Explain where a LLaVA-style multimodal LLM looks (R-GAE relevance maps and baselines).",
        __version__,
        "rgae.commands",
        COMMANDS,
    )


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
