"""Fixtures of the plugin's integration tests: a node folder and a plugin starter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.forkserver import ForkServer
from tests.support.oracle import Oracle, oracle_binary
from tests.support.plugin import Node, Start, plugins, short_tmp


@pytest.fixture
def node() -> Iterator[Node]:
    """A fresh node: registry, plugin data, CDI and local-mode folders under a short path
    (a unix socket path holds at most 107 bytes)."""
    with short_tmp() as root:
        yield Node(root)


@pytest.fixture
def start(node: Node) -> Iterator[Start]:
    with plugins(node) as start_:
        yield start_


@pytest.fixture(scope="module")
def forks() -> Iterator[ForkServer]:
    """Fast `gpu-dra` processes: the driver imported once per test module."""
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def oracle() -> Iterator[Oracle]:
    """The upstream oracle (tests/oracle: kube-scheduler's allocator and CEL), built with
    Go on first use."""
    binary = oracle_binary()
    if binary is None:
        pytest.skip("Go is not installed: cannot build the upstream oracle")
    with Oracle(binary) as running:
        yield running
