"""Atomic file writes with the umask's normal permissions, for everything the project writes to disk."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``target``: readers never see a half-written file.

    The file gets the permissions any ordinary ``open(target, "w")`` would give it (``0o666`` minus the umask:
    0644 under umask 022), not ``mkstemp``'s owner-only 0600: figures, summaries and checkpoints are meant to be
    read by others. The temporary file is created with mode 0o666 and the kernel applies the umask itself, so the
    process-wide umask is never changed (changing it would race with other threads creating files).

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> old = os.umask(0o027)
        >>> path = atomic_write(os.path.join(folder, "a.txt"), lambda tmp: open(tmp, "w").write("hi"))
        >>> _ = os.umask(old)
        >>> oct(path.stat().st_mode & 0o777), path.read_text()
        ('0o640', 'hi')
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(target)
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return target


def _create_temporary(target: Path) -> Path:
    """An empty new file beside ``target`` (same filesystem, so the rename is atomic), mode 0o666 & ~umask."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {target}")
