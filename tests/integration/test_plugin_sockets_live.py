"""A socket that answers belongs to a live plugin: a second plugin on the same paths refuses
to start, names the socket and touches nothing (in-process, and as a process: exit 2, one
line); a plugin that stops removes only the socket files it bound, never another's."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from driver.plugin.sockets import SocketInUse
from tests.support.plugin import Node, Start, inode, make_claim, result


def test_a_second_plugin_on_live_sockets_is_refused_and_touches_nothing(
        node: Node, start: Start) -> None:
    first = start()
    claim = make_claim(node.local, [result("gpu-0")])
    assert first.kubelet.prepare([claim])[claim.uid].error == ""
    sockets = {path: inode(path) for path in (node.dra_socket, node.registration_socket)}
    checkpoint = node.checkpoint.read_bytes()
    with pytest.raises(SocketInUse, match=rf"^the socket {node.dra_socket} is in use: "
                                          "another process accepts connections on it"):
        start()
    assert {path: inode(path) for path in sockets} == sockets
    assert node.checkpoint.read_bytes() == checkpoint
    assert first.kubelet.get_info().name
    other = make_claim(node.local, [result("gpu-1")])
    assert first.kubelet.prepare([other])[other.uid].error == ""
    first.stop()
    assert not any(path.exists() for path in sockets)


def test_a_second_plugin_process_exits_2_naming_the_live_socket(
        node: Node, start: Start) -> None:
    first = start()
    registration = inode(node.registration_socket)
    # its own plugin dir: only the registration socket is in the way
    args = [*node.cli_args("l4-8x"), "--plugin-data-dir", str(node.root / "other")]
    done = subprocess.run([sys.executable, "-m", "driver.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"gpu-dra plugin: cannot start: the socket {node.registration_socket} is in use")
    assert "Traceback" not in done.stderr
    assert inode(node.registration_socket) == registration
    assert first.kubelet.get_info().name


@pytest.fixture
def listeners() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def listen(path: Path, stack: ExitStack) -> None:
    """Another process's socket at `path`, bound after the plugin's was unlinked."""
    path.unlink()
    server = stack.enter_context(socket.socket(socket.AF_UNIX))
    server.bind(str(path))
    server.listen()


def test_a_stopping_plugin_removes_only_the_sockets_it_bound(
        node: Node, start: Start, listeners: ExitStack) -> None:
    first = start()
    for path in (node.dra_socket, node.registration_socket):
        listen(path, listeners)
    others = {path: inode(path) for path in (node.dra_socket, node.registration_socket)}
    first.stop()
    assert {path: inode(path) for path in others} == others
