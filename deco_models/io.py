"""Safe, atomic file I/O shared by every package: checkpoints are untrusted input."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``target``: readers never see a half-written file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def read_json_lines(text: str, source: str | os.PathLike) -> list:
    """The JSON values of a JSON Lines text, one per non-empty line; a bad line raises ``ValueError`` naming
    ``source:line``.

    Example:
        >>> read_json_lines('{"a": 1}\\n\\n{"a": 2}\\n', "q.jsonl")
        [{'a': 1}, {'a': 2}]
    """
    import json

    values = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{line_no}: not a JSON record ({exc})") from None
    return values


def load_torch_file(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    """Load a ``.bin``/``.pt`` state dict with ``weights_only=True`` (never unpickle arbitrary objects)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} contains objects other than tensors and plain containers; refusing to unpickle it "
            f"(checkpoints are untrusted). Convert it to safetensors. Details: {exc}"
        ) from None


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load tensors from ``.safetensors`` or (weights-only) ``.bin``/``.pt``/``.pth``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_torch_file(path)
