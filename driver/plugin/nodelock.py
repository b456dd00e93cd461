"""The node-wide lock that serializes prepare and unprepare across plugin processes.

During a rolling update (DaemonSet maxSurge) the old and the new plugin pod run side by
side, and the kubelet may call either one; both work on the same checkpoint, MIG devices
and CDI specs. Every call holds an flock on `serialize.lock` in the plugin data dir (the
file the upstream kubeletplugin helper locks for the same purpose). The calls of one
process share a single hold, so calls inside a pod still run concurrently (the per-claim
and per-GPU locks order them), and the other process waits until none is in flight. The
process that takes the lock first runs `on_acquire` (the plugin re-reads the checkpoint
there: the other process may have changed it), and runs `on_release` before it lets the
lock go (the plugin writes its checkpoint's snapshot whole there). While `linger` says so
(the snapshot lags the journal), the lock is kept with no call in flight until another
process waits for it (checked every `_IDLE_POLL`) or `close`: so the lock is free only
while the snapshot holds every claim, unless this process was killed.

Fairness: a process waiting for the lock holds `serialize.lock.want` exclusively while it
waits, and a new call joins its process's hold only while nobody holds that file; so once
the other process waits, this one lets no new call in, its calls in flight end, and the
other gets the lock however busy this one is (its own next calls wait for `.want` first,
so the two alternate).

Lock order, everywhere: claim locks, then this lock, then the records' lock (`records`).
The files are opened read-only (flock needs no more), so a held lock does not keep the
data dir's file system from being remounted read-only.
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
_IDLE_POLL = 0.05  # how often a kept lock looks for another process waiting for it


class LockTimeout(PluginError):
    """Another process held the lock until the caller's deadline; names the file."""


class LockFailure(PluginError):
    """A lock file cannot be opened or locked (not a wait: a broken directory); names it."""


class NodeLock:
    def __init__(self, path: Path, on_acquire: Callable[[], None],
                 on_release: Callable[[], None] = lambda: None,
                 linger: Callable[[], bool] = lambda: False) -> None:
        self.path = path
        self.want_path = path.with_name(path.name + WANT_SUFFIX)
        self._on_acquire = on_acquire
        self._on_release = on_release
        self._linger = linger
        self._cond = threading.Condition()
        self._users = 0
        self._taking = False
        self._closed = False
        self._fd: int | None = None
        self._watcher: threading.Thread | None = None

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
                if self._fd is not None:
                    if not self._other_waits():
                        self._users += 1
                        return
                    if self._users == 0:  # kept, and another process waits: its turn
                        self._release()
                        continue
                elif not self._taking:
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
            return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise LockFailure(f"cannot open {path}: {err}") from None

    def _leave(self) -> None:
        with self._cond:
            self._users -= 1
            if self._users == 0 and self._fd is not None:
                if self._closed or not self._linger() or self._may_wait():
                    self._release()
                elif self._watcher is None:
                    self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                     name="node-lock-watch")
                    self._watcher.start()
                else:
                    self._cond.notify_all()  # the watcher: the lock is kept now

    def _release(self) -> None:
        """Under `_cond`, no call in flight: `on_release`, then the flock goes."""
        assert self._fd is not None
        try:
            self._on_release()
        finally:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None
            self._cond.notify_all()

    def _kept(self) -> bool:
        return self._fd is not None and self._users == 0 and not self._taking

    def _may_wait(self) -> bool:
        """`_other_waits`, and True when it cannot tell: then the lock goes."""
        try:
            return self._other_waits()
        except LockFailure:
            return True

    def _watch(self) -> None:
        """While the lock is kept with no call in flight, hand it over once another process
        waits for it; ends at `close`."""
        while True:
            with self._cond:
                while not self._closed and not self._kept():
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(_IDLE_POLL)
            with self._cond:
                if self._kept() and self._may_wait():
                    self._release()

    def close(self) -> None:
        """Keep the lock no longer: let it go now if no call is in flight, else when the
        last one ends."""
        with self._cond:
            self._closed = True
            if self._kept():
                self._release()
            self._cond.notify_all()

    def _timeout(self) -> LockTimeout:
        return LockTimeout(f"another plugin process on this node holds {self.path} (a rolling "
                           "update runs two); try again")
