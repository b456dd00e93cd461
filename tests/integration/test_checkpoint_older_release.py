"""A plugin release that reads no journal (each before issue 12, defect 11) reads
checkpoint.json alone, so it must find every prepared claim there whenever it gets the
node lock: when it waits for the lock while this release keeps it (a rolling update
either way), and after a graceful stop (a downgrade)."""

from __future__ import annotations

import json
import subprocess
import sys

from driver.plugin import journal
from driver.plugin.nodelock import LOCK_FILE
from tests.support.plugin import Node, Start, make_claim, result

OLDER_POD = """
import json, sys, time
from pathlib import Path
from driver.plugin.nodelock import NodeLock
with NodeLock(Path(sys.argv[1]), lambda: None).hold(time.monotonic() + 60):
    print(json.dumps(sorted(json.loads(Path(sys.argv[2]).read_text())["claims"])))
"""


def older_pod_reads(node: Node) -> list[str]:
    """The claims an older release's process finds in checkpoint.json once it holds the
    node lock (it waits for it as any release does)."""
    done = subprocess.run([sys.executable, "-c", OLDER_POD, str(node.plugin_dir / LOCK_FILE),
                           str(node.checkpoint)], capture_output=True, text=True, timeout=60,
                          check=True)
    read: list[str] = json.loads(done.stdout)
    return read


def test_an_older_release_waiting_for_the_node_lock_finds_every_claim(
        node: Node, start: Start) -> None:
    running = start("l4-8x")
    claims = [make_claim(node.local, [result(f"gpu-{i}")]) for i in range(3)]
    for claim in claims:
        assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert running.kubelet.unprepare([claims[0]]) == {claims[0].uid: ""}
    # the saves are in the journal only, and the plugin keeps the lock meanwhile
    assert json.loads(node.checkpoint.read_text())["claims"] == {}
    assert older_pod_reads(node) == sorted(c.uid for c in claims[1:])
    later = make_claim(node.local, [result("gpu-7")])  # the plugin takes the lock back
    assert running.kubelet.prepare([later])[later.uid].error == ""
    assert older_pod_reads(node) == sorted(c.uid for c in [*claims[1:], later])


def test_an_older_release_after_a_graceful_stop_finds_every_claim(node: Node,
                                                                   start: Start) -> None:
    running = start("l4-8x")
    claims = [make_claim(node.local, [result(f"gpu-{i}")]) for i in range(3)]
    assert all(a.error == "" for a in running.kubelet.prepare(claims).values())
    running.stop()
    assert older_pod_reads(node) == sorted(c.uid for c in claims)
    assert journal.path_for(node.checkpoint).read_bytes() == \
        journal.header(node.checkpoint.read_bytes())  # nothing left in the journal only
