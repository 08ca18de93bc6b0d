"""Shared plumbing of the command lines (``rgae``, ``deco``): subcommands are modules with ``add_parser``, user
mistakes end in one line on stderr and exit code 2, and the run is quiet unless ``--verbose`` is given.

A command reports a user mistake by raising :class:`UsageError`; :func:`run` prints it as
``PROG COMMAND: error: MESSAGE`` and returns 2, without a traceback. Every other exception is a bug and keeps its
traceback. argparse's own errors (a missing required option, a bad choice) are one line with exit code 2 as well.
The cheap checks every command needs (an input file, an image, an output folder, a device) are here, so that a
command validates its arguments before it loads a model.

Example:
    >>> import argparse
    >>> parser = OneLineErrorParser(prog="tool")
    >>> sub = parser.add_subparsers(dest="command")
    >>> def fail(args):
    ...     raise UsageError("--out out.json is an existing file")
    >>> sub.add_parser("go").set_defaults(func=fail)
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     code = run(parser, ["go"])
    >>> code, err.getvalue()
    (2, 'tool go: error: --out out.json is an existing file\\n')
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A user mistake on the command line (a bad path, name or value): one line on stderr, exit code 2."""


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Inside the block, exceptions of ``types`` are user mistakes: they become :class:`UsageError` (same text).

    For library calls that validate what the user gave (a data file's records, a config's keys); keep the block
    to that one call, so that a bug raising the same type elsewhere still shows its traceback.

    Example:
        >>> with user_errors(ValueError):
        ...     int("x")
        Traceback (most recent call last):
        rgae.cli_base.UsageError: invalid literal for int() with base 10: 'x'
    """
    try:
        yield
    except types as exc:
        raise UsageError(_one_line(str(exc) or type(exc).__name__)) from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit code 2.

    argparse prints the whole usage block before the message; for a command with a dozen options that pushes the
    one line that matters off the screen."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` whose description keeps indented blocks verbatim (examples stay one per line) and refills the other
    paragraphs, and that shows every option's default, except where there is nothing to show (``None``, ``False``)
    or the help text already says it."""

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
            if paragraph.startswith((" ", "\t")):
                paragraphs.append(textwrap.indent(paragraph, indent))
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text or "%(default)" in text
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)).replace("%", "%%") if isinstance(default, list | tuple) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def build_parser(prog: str, description: str, version: str, package: str, commands: tuple[str, ...]):
    """A parser whose subcommands are the modules ``{package}.{name}`` for ``name`` in ``commands``; each module's
    ``add_parser(subparsers)`` registers its parser and sets ``func``. Every subcommand gets ``-v/--verbose``."""
    parser = OneLineErrorParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands:
        importlib.import_module(f"{package}.{name.replace('-', '_')}").add_parser(sub)  # explain-dataset
        command = sub.choices[name]
        if "--verbose" not in command._option_string_actions:
            command.add_argument("-v", "--verbose", action="store_true",
                                 help="show details: transformers' info logs and progress bars, the project's logs")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand (help when none is given); returns the exit code.

    A :class:`UsageError` becomes one line on stderr and exit code 2; with ``--verbose`` the run shows
    transformers' info logs and progress bars (:func:`rgae.verbosity.verbose_output`)."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    details = contextlib.nullcontext()
    if getattr(args, "verbose", False):
        from rgae.verbosity import verbose_output

        details = verbose_output()
    try:
        with details:
            return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def help_text(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: reStructuredText's ````code```` quotes and ``::`` markers
    dropped, ``\\`` line continuations kept.

    Example:
        >>> help_text("``deco eval``: score.\\n\\nExamples::\\n\\n    deco eval --task pope")
        'deco eval: score.\\n\\nExamples:\\n\\n    deco eval --task pope'
    """
    text = re.sub(r"``(.+?)``", r"\1", doc or "")
    text = re.sub(r":[a-z]+:`~?(.+?)`", r"\1", text)  # :func:`x` -> x
    text = re.sub(r"(?m)(\S)::$", r"\1:", text)
    return text.strip("\n")


# ---- cheap checks, run before any model is loaded ---------------------------------------------------------------


def check_input_file(path: str | os.PathLike, option: str, what: str = "a file") -> Path:
    """``path`` is an existing, readable regular file (``what``, with its article, names it in the message);
    :class:`UsageError` naming ``option`` otherwise."""
    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(f"{option} {path}: no such file (expected {what})")
    if file.is_dir():
        raise UsageError(f"{option} {path} is a directory, not {what}")
    if not os.access(file, os.R_OK):
        raise UsageError(f"{option} {path}: permission denied (cannot read {what})")
    return file


def check_input_folder(path: str | os.PathLike, option: str, what: str = "a folder") -> Path:
    """``path`` is an existing directory; :class:`UsageError` naming ``option`` otherwise."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"{option} {path}: no such folder (expected {what})")
    if not folder.is_dir():
        raise UsageError(f"{option} {path} is a file, not {what}")
    return folder


def check_image(path: str | os.PathLike, option: str = "--image") -> Path:
    """``path`` is a readable image file (it is decoded once: a few ms); :class:`UsageError` for a missing,
    unreadable, directory or non-image path."""
    from PIL import Image, UnidentifiedImageError

    file = check_input_file(path, option, what="an image file")
    try:
        with Image.open(file) as image:
            image.load()  # decode now: a truncated file fails here, not after the model has loaded
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{option} {path} is not a readable image ({_one_line(str(exc))})") from None
    return file


def _check_creatable(path: Path, shown, option: str, what: str) -> None:
    """The nearest existing ancestor of ``path`` is a directory (else nothing can be created below it)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {shown}: {parent} is a file, so the {what} cannot be created")
            return


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` can be used as an output folder: missing (it will be created) or an existing directory."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {path} is an existing file; give a folder (it is created if missing)")
    _check_creatable(folder, path, option, "folder")
    return folder


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` can be written as a file: not an existing directory, and not below an existing file."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    _check_creatable(file, path, option, "file")
    return file


def check_device(device: str | None, option: str = "--device") -> str:
    """The torch device to use: ``device``, or ``cuda`` when available and ``cpu`` otherwise. A CUDA device on a
    machine without CUDA, or a name torch does not know, is a :class:`UsageError`."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        if torch.version.cuda is None:
            raise UsageError("CUDA is not available; this torch is a CPU build")
        if not torch.cuda.is_available():
            raise UsageError(f"CUDA is not available: this torch (CUDA {torch.version.cuda}) sees no GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
