"""Replacing a file so that a reader, or a process killed at any instant, sees the old or the
new content and never a mix; and a folder's lock, for those who set up what it holds."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, data: bytes, durable: bool) -> None:
    """Temp file in the same directory (a name no reader picks up), then rename over
    `path`; durable: fsync the file before and the directory after the rename. The temp
    file is made as mkstemp makes one (O_EXCL, mode 0600), with a plain `os.open` and
    `os.write`: tempfile's and a file object's Python took a third of a CDI spec's write."""
    tmp, fd = _create_temp(path)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
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


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd`: one write(), unless it is short (then the next one writes the
    rest or fails)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _create_temp(path: Path) -> tuple[str, int]:
    """`.<name>.<random>.tmp` beside `path`, created exclusively; its name and descriptor."""
    folder, name = os.fspath(path.parent), path.name
    while True:
        tmp = os.path.join(folder, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue  # 48 random bits taken already: draw again, as mkstemp does


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
