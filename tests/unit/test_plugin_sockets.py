"""Socket names for rolling updates, as the upstream kubeletplugin helper names them
(`RollingUpdate(uid)`): per pod UID, the registration socket shortened by hashing where its
path would not fit a socket address (107 bytes); without a UID, the usual names. A path of
107 bytes really binds and answers; a longer one is refused up front, naming the flag; dead
pods' sockets are removed, live ones never: binding replaces a dead socket and refuses a live
one."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from driver._proto.pluginregistration_v1 import api_pb2 as reg_v1
from driver._proto.pluginregistration_v1 import api_pb2_grpc as reg_v1_grpc
from driver.cli.main import UsageError, build_parser, cmd_plugin
from driver.plugin.daemon import PluginOptions
from driver.plugin.servers import RegistrationServicer, _bind_unix
from driver.plugin.sockets import (
    SOCKET_PATH_MAX,
    SocketFile,
    SocketInUse,
    grpc_address,
    remove_dead_sockets,
    rolling_update_socket_name,
)
from tests.support.plugin import short_tmp

UID = "0b7c6a2e-1f4d-4d8e-9a51-3c2f6e8d9b10"


def options(pod_uid: str | None, registry: str = "/var/lib/kubelet/plugins_registry"
            ) -> PluginOptions:
    return PluginOptions(driver="gpu.dra.dev", node="n", registry_dir=Path(registry),
                         plugin_dir=Path("/var/lib/kubelet/plugins/gpu.dra.dev"),
                         cdi_root=Path("/var/run/cdi"), pod_uid=pod_uid)


def test_without_a_pod_uid_the_names_are_the_usual_ones() -> None:
    plain = options(None)
    assert plain.registration_socket == Path(
        "/var/lib/kubelet/plugins_registry/gpu.dra.dev-reg.sock")
    assert plain.dra_socket == Path("/var/lib/kubelet/plugins/gpu.dra.dev/dra.sock")


def test_with_a_pod_uid_both_sockets_carry_it() -> None:
    rolling = options(UID)
    assert rolling.registration_socket == Path(
        f"/var/lib/kubelet/plugins_registry/gpu.dra.dev-{UID}-reg.sock")
    assert rolling.dra_socket == Path(f"/var/lib/kubelet/plugins/gpu.dra.dev/dra-{UID}.sock")
    assert rolling.lock_path == Path("/var/lib/kubelet/plugins/gpu.dra.dev/serialize.lock")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("driver", ["gpu.dra.dev", "gpus.with-a-long-name.example.com"])
def test_a_long_registry_path_gets_the_hashed_names_in_upstream_order(driver: str) -> None:
    uid_hash = b64(hashlib.sha256(UID.encode()).digest()[:8])
    pair_hash = b64(hashlib.sha256(f"{driver}\0{UID}".encode()).digest()[:16])
    candidates = [f"{driver}-{UID}-reg.sock", f"{driver}-{uid_hash}-reg.sock",
                  f"dra-{pair_hash}-reg.sock"]
    for i, name in enumerate(candidates):
        # the longest directory where this name fits and none before it does
        directory = Path("/" + "d" * (SOCKET_PATH_MAX - len(name) - 2))
        assert len(str(directory / name)) == SOCKET_PATH_MAX
        if any(len(str(directory / c)) <= SOCKET_PATH_MAX for c in candidates[:i]):
            continue
        assert rolling_update_socket_name(directory, driver, UID) == name
    assert rolling_update_socket_name(Path("/" + "d" * 200), driver, UID) == candidates[2]
    assert rolling_update_socket_name(Path("/r"), driver, UID) == candidates[0]


def test_the_flag_and_its_env_and_a_bad_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_UID", UID)
    assert build_parser().parse_args(["plugin"]).pod_uid == UID
    monkeypatch.setenv("POD_UID", "")
    assert build_parser().parse_args(["plugin"]).pod_uid is None
    args = build_parser().parse_args(["plugin", "--mock", "l4-8x", "--pod-uid", "../x"])
    with pytest.raises(UsageError, match=r"--pod-uid \(env POD_UID\): '\.\./x' is not a pod"):
        cmd_plugin(args)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmp() as root:
        yield root


def padded(directory: Path, size: int, suffix: str = ".sock") -> Path:
    """A path of `size` bytes in `directory`."""
    path = directory / ("x" * (size - len(str(directory)) - 1 - len(suffix)) + suffix)
    assert len(os.fsencode(path)) == size
    return path


def test_a_socket_path_of_the_full_107_bytes_binds_and_answers(tmp: Path) -> None:
    path = padded(tmp, SOCKET_PATH_MAX)
    server = grpc.server(ThreadPoolExecutor(1))
    reg_v1_grpc.add_RegistrationServicer_to_server(RegistrationServicer("gpu.dra.dev", path),
                                                   server)
    _bind_unix(server, path)
    server.start()
    try:
        with grpc.insecure_channel(grpc_address(path)) as channel:
            info = reg_v1_grpc.RegistrationStub(channel).GetInfo(reg_v1.InfoRequest(),
                                                                 timeout=10)
        assert info.name == "gpu.dra.dev"
    finally:
        server.stop(0)


@pytest.mark.parametrize("pod_uid", [None, UID])
def test_socket_paths_longer_than_107_bytes_are_refused_naming_the_flag(
        tmp: Path, pod_uid: str | None) -> None:
    dra = f"dra-{pod_uid}.sock" if pod_uid else "dra.sock"
    plugin_dir = padded(tmp, SOCKET_PATH_MAX, suffix="/" + dra).parent
    fits = PluginOptions(driver="gpu.dra.dev", node="n", registry_dir=tmp,
                         plugin_dir=plugin_dir, cdi_root=tmp, pod_uid=pod_uid)
    assert len(os.fsencode(fits.dra_socket)) == SOCKET_PATH_MAX
    with pytest.raises(ValueError, match=r"^--plugin-data-dir \(env PLUGIN_DATA_DIR\): the "
                       rf"socket path {plugin_dir}x/{dra} is 108 bytes"):
        PluginOptions(driver="gpu.dra.dev", node="n", registry_dir=tmp,
                      plugin_dir=Path(f"{plugin_dir}x"), cdi_root=tmp, pod_uid=pod_uid)
    registry = Path("/" + "r" * 100)  # even the hashed names do not fit
    with pytest.raises(ValueError, match=r"^--kubelet-registry-dir \(env KUBELET_REGISTRY_DIR"
                                         r"\): the socket path /r+/\S+ is \d+ bytes, a unix "
                                         r"socket path holds at most 107"):
        PluginOptions(driver="gpu.dra.dev", node="n", registry_dir=registry,
                      plugin_dir=tmp, cdi_root=tmp, pod_uid=pod_uid)


def test_cleanup_with_a_pod_uid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEANUP_ON_EXIT", "true")
    monkeypatch.setenv("POD_UID", UID)
    args = build_parser().parse_args(["plugin", "--mock", "l4-8x"])
    with pytest.raises(UsageError, match=r"--cleanup \(env CLEANUP_ON_EXIT\) and --pod-uid "
                                         r"\(env POD_UID\) cannot be combined"):
        cmd_plugin(args)


def abandoned(path: Path) -> Path:
    """A socket file whose process is gone (bound, never unlinked)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


def test_dead_pods_sockets_are_removed_and_live_ones_kept(tmp: Path) -> None:
    registry, plugin_dir = tmp / "reg", tmp / "plugin"
    registry.mkdir()
    plugin_dir.mkdir()
    dead = [abandoned(registry / f"gpu.dra.dev-{UID}-reg.sock"),
            abandoned(registry / "gpu.dra.dev-reg.sock"),
            abandoned(registry / "gpu.dra.dev-AbC_-12345x-reg.sock"),
            abandoned(plugin_dir / f"dra-{UID}.sock"), abandoned(plugin_dir / "dra.sock")]
    others = [abandoned(registry / f"other.example.com-{UID}-reg.sock"),
              abandoned(registry / "dra-0123456789abcdefABCDEF-reg.sock"),
              abandoned(plugin_dir / "mps.sock")]
    (registry / "gpu.dra.dev-1-reg.sock").write_text("")  # not a socket
    with socket.socket(socket.AF_UNIX) as live, socket.socket(socket.AF_UNIX) as live_dra:
        live.bind(str(registry / "gpu.dra.dev-live-reg.sock"))
        live.listen()
        live_dra.bind(str(plugin_dir / "dra-live.sock"))
        live_dra.listen()
        assert sorted(remove_dead_sockets(registry, plugin_dir, "gpu.dra.dev")) == sorted(dead)
    assert not any(path.exists() for path in dead)
    assert all(path.exists() for path in others)
    assert sorted(p.name for p in registry.iterdir()) == sorted(
        ["gpu.dra.dev-1-reg.sock", "gpu.dra.dev-live-reg.sock",
         *(p.name for p in others[:2])])
    assert sorted(p.name for p in plugin_dir.iterdir()) == ["dra-live.sock", "mps.sock"]
    assert remove_dead_sockets(tmp / "none", tmp / "none", "gpu.dra.dev") == []


def test_binding_replaces_a_dead_socket_and_refuses_a_live_one(tmp: Path) -> None:
    """The start-up check can be outrun: another plugin may bind between it and the bind."""
    dead, live = abandoned(tmp / "dead.sock"), tmp / "live.sock"
    server = grpc.server(ThreadPoolExecutor(1))
    try:
        assert _bind_unix(server, dead).inode == os.lstat(dead).st_ino
        with socket.socket(socket.AF_UNIX) as dial:
            dial.connect(str(dead))  # the dead socket was replaced by a listening one
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(live))
            other.listen()
            before = os.lstat(live).st_ino
            with pytest.raises(SocketInUse, match=f"^the socket {live} is in use"):
                _bind_unix(server, live)
            assert os.lstat(live).st_ino == before
    finally:
        server.stop(0)
    assert sorted(os.listdir(tmp)) == ["dead.sock", "live.sock"]  # no private names left


def test_a_socket_file_is_removed_only_while_it_is_the_one_bound(tmp: Path) -> None:
    first = abandoned(tmp / "first.sock")
    mine = SocketFile.link(first, tmp / "dra.sock")
    with pytest.raises(SocketInUse, match="another plugin bound it just now"):
        SocketFile.link(first, mine.path)
    mine.path.unlink()
    theirs = abandoned(mine.path)
    mine.remove()
    assert theirs.exists()
    SocketFile.link(first, theirs.with_name("x.sock")).remove()
    assert not (tmp / "x.sock").exists()
