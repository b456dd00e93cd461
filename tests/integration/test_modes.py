"""The modes of what the plugin creates do not depend on the umask: under umask 000 nothing
is open to every user, and under umask 077 the CDI dir stays readable by the container
runtime. Directories that exist already keep their modes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.plugin import Node, Start, make_claim, result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(params=[0o000, 0o077], ids=["umask-000", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def test_what_the_plugin_creates_has_explicit_modes(node: Node, start: Start,
                                                    umask: int) -> None:
    dirs = node.root / "var"  # created by the plugin, with every directory on the way
    plugin_dir, registry, cdi_root = dirs / "p" / "d", dirs / "r" / "g", dirs / "c" / "d"
    existing = node.root / "kept"
    existing.mkdir(mode=0o751)
    os.chmod(existing, 0o751)
    running = start(plugin_dir=plugin_dir, registry_dir=registry, cdi_root=existing / "cdi")
    running.stop()
    assert mode(existing) == 0o751
    running = start(plugin_dir=plugin_dir, registry_dir=registry, cdi_root=cdi_root)
    claim = make_claim(node.local, [result("gpu-0")])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert {p: mode(p) for p in (plugin_dir, plugin_dir.parent, registry, registry.parent)} \
        == dict.fromkeys((plugin_dir, plugin_dir.parent, registry, registry.parent), 0o700)
    assert mode(cdi_root) == mode(cdi_root.parent) == 0o755
    assert mode(running.plugin.options.dra_socket) == 0o600
    assert mode(running.plugin.options.registration_socket) == 0o600
    private = [p for p in plugin_dir.iterdir() if not stat.S_ISSOCK(p.lstat().st_mode)]
    assert {p.name: mode(p) & 0o077 for p in private} == {p.name: 0 for p in private}
    specs = list(cdi_root.iterdir())
    assert specs  # the claim's spec: the runtime may read it, nobody else may write it
    assert {p.name: mode(p) & 0o022 for p in specs} == {p.name: 0 for p in specs}
