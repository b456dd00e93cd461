"""The plugin's unix sockets: their names (per pod in a rolling update), the path length the
kernel and the kubelet accept, the removal of sockets that dead pods left behind, and the
refusal to replace or remove a socket that another plugin serves on.

Limits: `sockaddr_un.sun_path` holds 108 bytes with the closing NUL, so a path may have 107;
Go's dialer (the kubelet) accepts 107; grpcio accepts 107 in the `unix:` form but only 105
in `unix://`, so the servers bind with `grpc_address`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from driver.errors import PluginError

log = logging.getLogger(__name__)

SOCKET_PATH_MAX = 107  # bytes of an AF_UNIX socket path, the NUL of sun_path[108] excluded
POD_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SUFFIX = r"[A-Za-z0-9._-]{1,128}"  # a pod UID, or the base64url hash that replaces it
_PROBE_TIMEOUT = 1.0


def path_bytes(path: Path | str) -> int:
    return len(os.fsencode(path))


def grpc_address(path: Path) -> str:
    """The address grpc binds and dials for the whole SOCKET_PATH_MAX."""
    return f"unix:{path}"


def rolling_update_socket_name(registry_dir: Path, driver: str, pod_uid: str) -> str:
    """The registration socket's name for a pod of a rolling update, chosen as upstream's
    RollingUpdateRegistrarSocketFile does: the first whose path fits a socket address of
    `<driver>-<uid>-reg.sock`, `<driver>-<b64(sha256(uid))[:8 bytes]>-reg.sock`,
    `dra-<b64(sha256(driver NUL uid))[:16 bytes]>-reg.sock` (base64url, unpadded)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    uid_hash = hashlib.sha256(pod_uid.encode()).digest()
    pair_hash = hashlib.sha256(f"{driver}\0{pod_uid}".encode()).digest()
    candidates = (f"{driver}-{pod_uid}-reg.sock", f"{driver}-{b64(uid_hash[:8])}-reg.sock",
                  f"dra-{b64(pair_hash[:16])}-reg.sock")
    return next((name for name in candidates
                 if path_bytes(os.path.join(registry_dir, name)) <= SOCKET_PATH_MAX),
                candidates[-1])


def too_long(flag: str, env: str, path: Path) -> str | None:
    """Why `path`, a socket under the directory `flag` names, cannot be bound; None if it
    can."""
    size = path_bytes(path)
    if size <= SOCKET_PATH_MAX:
        return None
    return (f"{flag} (env {env}): the socket path {path} is {size} bytes, a unix socket path "
            f"holds at most {SOCKET_PATH_MAX}; use a shorter directory")


def _ours(driver: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The names this driver gives its registration sockets (the registry is shared with
    other drivers) and its DRA sockets (in its own data dir). The fully hashed fallback
    `dra-<hash>-reg.sock` does not name the driver: it is left alone."""
    return (re.compile(rf"{re.escape(driver)}(-{_SUFFIX})?-reg\.sock"),
            re.compile(rf"dra(-{_SUFFIX})?\.sock"))


def _connect_error(path: Path) -> OSError | None:
    """Why connecting to the socket file fails; None if something accepts the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except OSError as err:
            return err
        return None


class SocketInUse(PluginError):
    """A socket at a path this plugin would bind answers: another plugin serves there."""

    reason = "socket_in_use"


def free_for_bind(path: Path) -> None:
    """Remove a dead socket at `path` (a killed plugin's) so that it can be bound; raise
    SocketInUse when one answers, or when that cannot be told: replacing a live plugin's
    socket makes the kubelet lose that plugin."""
    err = _connect_error(path)
    if _remove_dead(path, err) or (err is not None and err.errno == errno.ENOENT):
        return
    why = "another process accepts connections on it" if err is None else \
        f"cannot tell whether a process serves on it ({err})"
    raise SocketInUse(f"the socket {path} is in use: {why}; stop that plugin or give this "
                      "one other paths")


def _remove_dead(path: Path, err: OSError | None) -> bool:
    """Remove the file at `path` if connecting to it was refused (`err`): no process listens
    there, a pod was killed. Whether it was removed."""
    if err is None or err.errno != errno.ECONNREFUSED:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    log.info("removed %s: no plugin listens on it (a pod that was killed)", path)
    return True


@dataclass(frozen=True)
class SocketFile:
    """A socket file this process bound, told apart by device and inode from one that
    another process bound at the same path since."""

    path: Path
    device: int
    inode: int

    @classmethod
    def link(cls, bound: Path, path: Path) -> SocketFile:
        """Give the socket bound at `bound` the name `path` too, unless that name is taken:
        a link, unlike a bind, never replaces what is there, so of two plugins that race
        for a path one fails."""
        try:
            os.link(bound, path)
        except FileExistsError:
            raise SocketInUse(f"the socket {path} is in use: another plugin bound it just "
                              "now; stop that plugin or give this one other paths") from None
        found = path.lstat()
        return cls(path, found.st_dev, found.st_ino)

    def remove(self) -> None:
        """Unlink the file if it is still this one; another plugin's is left alone."""
        try:
            found = self.path.lstat()
        except FileNotFoundError:
            return
        if (found.st_dev, found.st_ino) != (self.device, self.inode):
            log.warning("left %s alone: another process bound it after this one", self.path)
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _sockets(registry_dir: Path, plugin_dir: Path, driver: str) -> Iterator[Path]:
    """This driver's socket files in the registry dir and its plugin data dir."""
    for directory, pattern in zip((registry_dir, plugin_dir), _ours(driver), strict=True):
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            path = directory / name
            with contextlib.suppress(FileNotFoundError):
                if pattern.fullmatch(name) and stat.S_ISSOCK(path.lstat().st_mode):
                    yield path


def remove_dead_sockets(registry_dir: Path, plugin_dir: Path, driver: str) -> list[Path]:
    """Remove this driver's sockets that no process listens on (a pod killed without its
    stop leaves them, and the kubelet's plugin watcher keeps trying them); a socket that
    accepts a connection, or any other file, is never touched. Returns those removed."""
    return [path for path in _sockets(registry_dir, plugin_dir, driver)
            if _remove_dead(path, _connect_error(path))]


def other_plugin_alive(registry_dir: Path, plugin_dir: Path, driver: str,
                       own: Collection[Path]) -> bool:
    """Whether another plugin pod of this driver runs on this node (the other pod of a
    rolling update): one of this driver's sockets, not one in ``own``, accepts a
    connection. The DRA sockets count too: they name the driver even where a registration
    socket's name had to be hashed, and they live until the pod's last call is done."""
    mine = {os.path.abspath(p) for p in own}
    return any(os.path.abspath(path) not in mine and _connect_error(path) is None
               for path in _sockets(registry_dir, plugin_dir, driver))
