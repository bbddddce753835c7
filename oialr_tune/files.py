"""The user's files and folders: read as text, or claimed for writing, with one-line errors.

Every command reads YAML the user wrote and writes into a folder the user named. What goes wrong
there (a file saved in another encoding, a read-only or full disk, a file where a folder should
be) is bad input, not a bug: it must come out as a :class:`~oialr_tune.errors.UserError` naming
the path, found before anything is written, rather than as a traceback half-way through.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from oialr_tune.errors import UserError

__all__ = ["read_text", "remove_empty", "replacing", "writable_folder", "write_atomic"]

def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path` (a `what`: "config", "search space", ...), or UserError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def writable_folder(path: str | Path, what: str) -> list[Path]:
    """Create folder `path` (and its missing parents), or check that the existing one is writable.

    Returns the folders this call created, deepest first, so a caller that fails before writing
    anything can take them back (:func:`remove_empty`). Raises UserError naming `path` (`what` says
    which folder: "results folder", "--out folder", ...) when it is a file, cannot be created, or is
    not writable (a read-only mount, another user's folder). An existing folder is checked with
    access(2), which writes nothing and also reports a read-only mount to root.
    """
    root = Path(path)
    missing = []
    p = root
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        where = "it is" if p == root else f"{p} is"
        raise UserError(f"{root}: cannot use it as the {what} ({where} a file, not a folder)")
    try:
        for folder in reversed(missing):
            folder.mkdir()
    except OSError as e:
        remove_empty(missing)
        raise UserError(f"{root}: cannot create the {what} ({e.strerror or e})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"{root}: cannot write into the {what} (a read-only filesystem, or no permission)")
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) where they are still empty: undo :func:`writable_folder`."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, or a function writing into a binary file, like ``torch.save``) to `path`
    so that a kill or a power cut leaves the old file or the new one, never half of either."""
    with replacing(path) as tmp, tmp.open("wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            data(f)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write the new file to (for writers that need a path, such
    as SQLite's backup); when the block ends it is fsynced and renamed over `path`, then the folder
    is fsynced so the rename itself survives (where the filesystem allows it). On an exception the
    temporary file is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
