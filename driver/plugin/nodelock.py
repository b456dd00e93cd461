"""The node-wide lock that serializes prepare and unprepare across plugin processes.

During a rolling update (DaemonSet maxSurge) the old and the new plugin pod run side by
side, and the kubelet may call either one; both work on the same checkpoint, MIG devices
and CDI specs. Every call holds an flock on `serialize.lock` in the plugin data dir (the
file the upstream kubeletplugin helper locks for the same purpose). The calls of one
process share a single hold, so calls inside a pod still run concurrently (the per-claim
and per-GPU locks order them), and the other process waits until none is in flight. The
process that takes the lock first runs `on_acquire` (the plugin re-reads the checkpoint
there: the other process may have changed it).

Lock order, everywhere: claim locks, then this lock, then the state's ledger mutex.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = "serialize.lock"
_POLL = 0.01  # flock cannot time out: poll a non-blocking try until the deadline


class LockTimeout(Exception):
    """Another process held the lock until the caller's deadline; names the file."""


class NodeLock:
    def __init__(self, path: Path, on_acquire: Callable[[], None]) -> None:
        self.path = path
        self._on_acquire = on_acquire
        self._cond = threading.Condition()
        self._users = 0
        self._taking = False
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self, deadline: float) -> Iterator[None]:
        """Hold the lock (shared with this process's other calls) until the block ends;
        LockTimeout if another process keeps it past `deadline` (time.monotonic)."""
        self._enter(deadline)
        try:
            yield
        finally:
            self._leave()

    def _enter(self, deadline: float) -> None:
        with self._cond:
            while self._fd is None and self._taking:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout()
                self._cond.wait(remaining)
            if self._fd is not None:
                self._users += 1
                return
            self._taking = True
        fd = None
        try:
            fd = self._take(deadline)
            self._on_acquire()
        except BaseException:
            if fd is not None:
                os.close(fd)
            with self._cond:
                self._taking = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._fd, self._users, self._taking = fd, 1, False
            self._cond.notify_all()

    def _take(self, deadline: float) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    os.close(fd)
                    raise self._timeout() from None
                time.sleep(min(_POLL, remaining))

    def _leave(self) -> None:
        with self._cond:
            self._users -= 1
            if self._users == 0 and self._fd is not None:
                os.close(self._fd)  # closing the only descriptor releases the flock
                self._fd = None
                self._cond.notify_all()

    def _timeout(self) -> LockTimeout:
        return LockTimeout(f"another plugin process on this node holds {self.path} (a rolling "
                           "update runs two); try again")
