"""The plugin's unix sockets: their names (per pod in a rolling update), the path length the
kernel and the kubelet accept, and the removal of sockets that dead pods left behind.

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
from pathlib import Path

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
    removed = []
    for path in _sockets(registry_dir, plugin_dir, driver):
        err = _connect_error(path)
        if err is None or err.errno != errno.ECONNREFUSED:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            log.info("removed %s: no plugin listens on it (a pod that was killed)", path)
            removed.append(path)
    return removed


def other_plugin_alive(registry_dir: Path, plugin_dir: Path, driver: str,
                       own: Collection[Path]) -> bool:
    """Whether another plugin pod of this driver runs on this node (the other pod of a
    rolling update): one of this driver's sockets, not one in ``own``, accepts a
    connection. The DRA sockets count too: they name the driver even where a registration
    socket's name had to be hashed, and they live until the pod's last call is done."""
    mine = {os.path.abspath(p) for p in own}
    return any(os.path.abspath(path) not in mine and _connect_error(path) is None
               for path in _sockets(registry_dir, plugin_dir, driver))
