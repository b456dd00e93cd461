"""The node-wide lock that serializes prepare and unprepare across plugin processes.

During a rolling update (DaemonSet maxSurge) the old and the new plugin pod run side by
side, and the kubelet may call either one; both work on the same checkpoint, MIG devices
and CDI specs. Every call holds an flock on `serialize.lock` in the plugin data dir (the
file the upstream kubeletplugin helper locks for the same purpose). The calls of one
process share a single hold, so calls inside a pod still run concurrently (the per-claim
and per-GPU locks order them), and the other process waits until none is in flight. The
process that takes the lock first runs `on_acquire` (the plugin re-reads the checkpoint
there: the other process may have changed it).

Fairness: a process waiting for the lock holds `serialize.lock.want` exclusively while it
waits, and a new call joins its process's hold only while nobody holds that file; so once
the other process waits, this one lets no new call in, its calls in flight end, and the
other gets the lock however busy this one is (its own next calls wait for `.want` first,
so the two alternate).

Lock order, everywhere: claim locks, then this lock, then the records' lock (`records`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from driver.errors import PluginError

LOCK_FILE = "serialize.lock"
WANT_SUFFIX = ".want"  # held by a process while it waits for LOCK_FILE
_POLL = 0.01  # flock cannot time out: poll a non-blocking try until the deadline


class LockTimeout(PluginError):
    """Another process held the lock until the caller's deadline; names the file."""


class LockFailure(PluginError):
    """A lock file cannot be opened or locked (not a wait: a broken directory); names it."""


class NodeLock:
    def __init__(self, path: Path, on_acquire: Callable[[], None]) -> None:
        self.path = path
        self.want_path = path.with_name(path.name + WANT_SUFFIX)
        self._on_acquire = on_acquire
        self._cond = threading.Condition()
        self._users = 0
        self._taking = False
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self, deadline: float) -> Iterator[None]:
        """Hold the lock (shared with this process's other calls) until the block ends;
        LockTimeout if another process keeps it past `deadline` (time.monotonic),
        LockFailure if a lock file cannot be used."""
        self._enter(deadline)
        try:
            yield
        finally:
            self._leave()

    def _enter(self, deadline: float) -> None:
        with self._cond:
            while True:
                if self._fd is not None and not self._other_waits():
                    self._users += 1
                    return
                if self._fd is None and not self._taking:
                    self._taking = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout()
                self._cond.wait(remaining)  # woken when this process's hold ends
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

    def _other_waits(self) -> bool:
        """Another process holds `.want`: it waits for the lock this process holds."""
        fd = self._open(self.want_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        except OSError as err:
            raise LockFailure(f"cannot lock {self.want_path}: {err}") from None
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _take(self, deadline: float) -> int:
        """The lock, taken exclusively with `.want` held while waiting for it."""
        want = self._open(self.want_path)
        try:
            self._flock(want, self.want_path, deadline)
            fd = self._open(self.path)
            try:
                self._flock(fd, self.path, deadline)
            except BaseException:
                os.close(fd)
                raise
            return fd
        finally:
            os.close(want)

    def _flock(self, fd: int, path: Path, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout() from None
                time.sleep(min(_POLL, remaining))
            except OSError as err:
                raise LockFailure(f"cannot lock {path}: {err}") from None

    @staticmethod
    def _open(path: Path) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise LockFailure(f"cannot open {path}: {err}") from None

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
