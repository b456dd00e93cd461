"""Disk faults under a plugin's directories: a small tmpfs mounted on a directory (as root),
filled to the last byte or remounted read-only, and the temp files a failed write leaves."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

FILLER = "filler"


def can_mount() -> str | None:
    """None if this process may mount a tmpfs, else why not."""
    return None if os.geteuid() == 0 else "mounting a tmpfs needs root"


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k", mode: int = 0o700) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (created if missing) until the block ends."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:04o}", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system under `directory`; the file that holds them."""
    filler = directory / FILLER
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, bytes(1 << 16))  # a short write first, then ENOSPC
    finally:
        os.close(fd)
    return filler


def remount(path: Path, mode: str, give_up: Callable[[], bool] = lambda: False) -> bool:
    """Remount the tmpfs on `path` `ro` or `rw`; while a file on it is open for writing,
    `ro` is refused (EBUSY), so it is retried until `give_up()` says stop (False then)."""
    while True:
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return True
        if mode != "ro" or "busy" not in done.stderr:  # EBUSY: "mount point is busy"
            raise AssertionError(f"mount -o remount,{mode} {path}: {done.stderr.strip()}")
        if give_up():
            return False
        time.sleep(0.001)


def leftovers(*directories: Path) -> list[str]:
    """Temp files (`*.tmp`) in the directories: what a write that failed or was cut off left."""
    return [p.name for d in directories if d.is_dir() for p in d.iterdir()
            if p.name.endswith(".tmp")]
