"""File writes with the umask's normal permissions (0666 & ~umask: 0644 under umask 022), atomic where we write.

Two writers are involved: :func:`atomic_write`, through which this project writes its own files, and third-party
writers (transformers' ``save_pretrained``, peft, the Trainer's checkpoints). Both meet the same trap: safetensors
0.8 writes a ``.safetensors`` file through a temporary file that it creates with mode 0600 and renames into place
(safetensors issue #782), so every ``model.safetensors`` or adapter came out readable by its owner only.
:func:`atomic_write` restores its temporary file's mode after the write; :func:`normal_file_modes` does the same for
the files a third-party writer creates inside a folder.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

# The mode of a file created through mkstemp / Python's tempfile / Rust's tempfile crate.
_TEMPFILE_MODE = 0o600


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``target``: readers never see a half-written file.

    The file gets the permissions any ordinary ``open(target, "w")`` would give it (``0o666`` minus the umask:
    0644 under umask 022), not ``mkstemp``'s owner-only 0600: figures, summaries and checkpoints are meant to be
    read by others. The temporary file is created with mode 0o666 and the kernel applies the umask itself, so the
    process-wide umask is never changed (changing it would race with other threads creating files); a ``write``
    that replaces the temporary file by its own (safetensors does) gets that mode back.

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
        created = tmp.stat()
        write(str(tmp))
        written = tmp.stat()
        if written.st_ino != created.st_ino and stat.S_IMODE(written.st_mode) != stat.S_IMODE(created.st_mode):
            os.chmod(tmp, stat.S_IMODE(created.st_mode))
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


def normal_mode(folder: str | os.PathLike) -> int:
    """The mode a new file gets in ``folder`` (0o666 & ~umask), found by creating one: reading the umask would mean
    setting it, which races with other threads."""
    probe = _create_temporary(Path(folder) / "mode-probe")
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink()


def _inodes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_ino for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


@contextlib.contextmanager
def normal_file_modes(folder: str | os.PathLike) -> Iterator[None]:
    """Files that a writer inside the block creates (or replaces) under ``folder`` with a temporary file's
    owner-only mode 0600 get the umask's normal mode instead. Files the block did not create, and files created
    with any other mode, are left as they are.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> old = os.umask(0o022)
        >>> with normal_file_modes(folder):
        ...     fd, name = tempfile.mkstemp(dir=folder)  # an owner-only file, as safetensors writes them
        ...     os.close(fd)
        >>> _ = os.umask(old)
        >>> oct(os.stat(name).st_mode & 0o777)
        '0o644'
    """
    folder = Path(folder)
    before = _inodes(folder)
    yield
    if not folder.is_dir():
        return
    mode = None
    for path, inode in _inodes(folder).items():
        if before.get(path) == inode:
            continue
        current = stat.S_IMODE(path.stat().st_mode)
        if current != _TEMPFILE_MODE:
            continue
        mode = normal_mode(folder) if mode is None else mode
        if mode != current:
            os.chmod(path, mode)
