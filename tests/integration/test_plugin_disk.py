"""A full or read-only disk under the plugin's data dir or the CDI dir (small tmpfs mounts,
as root): the call fails with the reason, what it did is undone, no file is half-written,
the claims prepared before are untouched, and calls succeed again once there is room."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.plugin import checkpoint
from tests.support.plugin import Node, Start, cdi_specs, make_claim, result

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system under `directory`."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def held(node: Node) -> set[str]:
    loaded = checkpoint.load(node.checkpoint)
    return set() if loaded is None else set(loaded.claims)


def leftovers(*directories: Path) -> list[str]:
    return [p.name for d in directories for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["plugin", "cdi"])
def test_a_full_disk_fails_the_call_and_undoes_it(node: Node, start: Start, where: str) -> None:
    directory = node.plugin_dir if where == "plugin" else node.cdi_root
    with tmpfs(directory):
        running = start("l4-8x")
        before = make_claim(node.local, [result("gpu-0")])
        assert running.kubelet.prepare([before])[before.uid].error == ""
        filler = fill(directory)
        # the checkpoint's journal may have room left in its last block: claims are
        # prepared until a write needs more
        prepared, error = {before.uid}, ""
        for _ in range(100):
            claim = make_claim(node.local, [result("gpu-1", admin=True)])
            error = running.kubelet.prepare([claim])[claim.uid].error
            if error:
                break
            prepared.add(claim.uid)
        assert "No space left on device" in error
        assert set(cdi_specs(node.cdi_root)) == prepared
        # the failed claim's record, if its first save was written, stays PrepareStarted
        # until the claim is prepared again
        assert held(node) - {claim.uid} == prepared
        assert not running.plugin.state.records.prepared(claim.uid)
        assert leftovers(node.plugin_dir, node.cdi_root) == []
        filler.unlink()
        assert running.kubelet.prepare([claim])[claim.uid].error == ""
        assert held(node) == {*prepared, claim.uid}
        running.stop()


def test_a_read_only_data_dir_fails_calls_and_changes_nothing(node: Node,
                                                                start: Start) -> None:
    with tmpfs(node.plugin_dir):
        running = start("l4-8x")
        prepared = make_claim(node.local, [result("gpu-0")])
        assert running.kubelet.prepare([prepared])[prepared.uid].error == ""
        remount(node.plugin_dir, "ro")
        try:
            claim = make_claim(node.local, [result("gpu-1")])
            assert "Read-only file system" in running.kubelet.prepare([claim])[claim.uid].error
            assert "Read-only file system" in running.kubelet.unprepare([prepared])[prepared.uid]
            assert set(cdi_specs(node.cdi_root)) == {prepared.uid}  # still prepared
        finally:
            remount(node.plugin_dir, "rw")
        assert held(node) == {prepared.uid}
        assert running.kubelet.unprepare([prepared]) == {prepared.uid: ""}
        assert cdi_specs(node.cdi_root) == {} and held(node) == set()
        running.stop()
