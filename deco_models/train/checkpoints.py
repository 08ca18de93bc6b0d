"""Crash-safe checkpoints on top of the Trainer's ``checkpoint-N`` folders.

The Trainer writes a checkpoint file by file; a run killed in the middle leaves a folder that looks like a checkpoint
but is not. After the Trainer has written *everything* (all ranks), :class:`deco_models.train.trainer.DecoTrainer`
drops a marker file (``checkpoint_complete.json``, itself written atomically) into the folder, and only then rotates
old checkpoints. :func:`find_resumable_checkpoint` resumes from the newest *marked* folder and moves unmarked ones
aside (``incomplete-checkpoint-N-<time>``), so neither ``--resume`` nor the Trainer's rotation ever sees them.

>>> import tempfile; d = tempfile.mkdtemp()
>>> os.makedirs(f"{d}/checkpoint-10"); _ = mark_complete(f"{d}/checkpoint-10", step=10)
>>> os.makedirs(f"{d}/checkpoint-20")  # killed while saving
>>> os.path.basename(find_resumable_checkpoint(d))
'checkpoint-10'
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from deco_models.io import atomic_write

logger = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    """Write the completion marker into ``checkpoint_dir`` (atomically)."""
    payload = json.dumps({"step": int(step), "time": time.time()})

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(Path(checkpoint_dir) / MARKER, write)


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_resumable_checkpoint(output_dir: str | os.PathLike, quarantine: bool = True) -> str | None:
    """Newest complete checkpoint in ``output_dir`` (None if there is none). With ``quarantine``, incomplete
    checkpoint folders are renamed out of the ``checkpoint-*`` namespace (only do that on one process)."""
    checkpoints = list_checkpoints(output_dir)
    complete = [path for _, path in checkpoints if is_complete(path)]
    if quarantine:
        for step, path in checkpoints:
            if not is_complete(path):
                target = path.with_name(f"incomplete-checkpoint-{step}-{int(time.time())}")
                logger.warning("checkpoint %s is incomplete (killed while saving?); moved to %s", path, target.name)
                os.replace(path, target)
    return str(complete[-1]) if complete else None


def rotate_complete_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain; returns what was deleted."""
    if not keep or keep <= 0:
        return []
    complete = [path for _, path in list_checkpoints(output_dir) if is_complete(path)]
    doomed = complete[: max(0, len(complete) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
