"""Safe file I/O of deco_models: checkpoints are untrusted input; writes are atomic (:func:`rgae.io.atomic_write`)."""

from __future__ import annotations

import os
from pathlib import Path

from rgae.io import atomic_write  # the one atomic writer (rgae's: rgae may not import deco_models)


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


__all__ = ["atomic_write", "load_state_dict", "load_torch_file", "read_json_lines"]
