"""A full or read-only disk under the plugin's data dir or the CDI dir (small tmpfs mounts,
as root): the call fails with the reason, what it did is undone, no file is half-written,
the claims prepared before are untouched, and calls succeed again once there is room."""

from __future__ import annotations

import pytest

from tests.support.disks import can_mount, fill, leftovers, remount, tmpfs
from tests.support.plugin import Node, Start, cdi_specs, make_claim, result

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=str(can_mount()))


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
        assert set(node.records()) - {claim.uid} == prepared
        assert not running.plugin.state.records.prepared(claim.uid)
        assert leftovers(node.plugin_dir, node.cdi_root) == []
        filler.unlink()
        assert running.kubelet.prepare([claim])[claim.uid].error == ""
        assert set(node.records()) == {*prepared, claim.uid}
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
        assert set(node.records()) == {prepared.uid}
        assert running.kubelet.unprepare([prepared]) == {prepared.uid: ""}
        assert cdi_specs(node.cdi_root) == {} and set(node.records()) == set()
        running.stop()
