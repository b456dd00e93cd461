"""Replacing a file so that a reader, or a process killed at any instant, sees the old or the
new content and never a mix; and a folder's lock, for those who set up what it holds."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, data: bytes, durable: bool) -> None:
    """Temp file in the same directory (a name no reader picks up), then rename over
    `path`; durable: fsync the file before and the directory after the rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_leftovers(directory: Path, prefix: str) -> list[Path]:
    """Delete temp files a killed writer left for targets named `prefix*`; returns them."""
    removed = []
    for path in directory.glob(f".{prefix}*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself, so those who set it up (processes that
    share it) take turns, with no lock file to leave behind."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
