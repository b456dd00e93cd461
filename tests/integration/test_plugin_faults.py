"""The plugin as a real process (`gpu-dra plugin --mock ...`): killed with SIGKILL at random
points while it prepares a dynamic MIG claim, it converges after every restart; SIGTERM
shuts it down cleanly; a damaged checkpoint stops it with one clear line; a checkpoint of
another schema version is read and its unknown fields kept."""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from driver.plugin import cdi, checkpoint
from tests.support.disks import leftovers
from tests.support.forkserver import ForkServer
from tests.support.plugin import (
    DRIVER,
    Claim,
    Daemon,
    Node,
    cdi_problems,
    cdi_specs,
    live_mig,
    make_claim,
    mig_profile,
    result,
)

KILLS = 50
# Dynamic MIG devices of the one H100 (h100-80gb-hbm3, MIG on) to prepare in turn: GI
# profile id and placement start.
DEVICES = {"gpu-0-mig-1g10gb-5": (19, 5), "gpu-0-mig-2g20gb-2": (14, 2),
           "gpu-0-mig-3g40gb-4": (9, 4), "gpu-0-mig-7g80gb-0": (0, 0)}
GPU0 = "GPU-38ab404c-3055-5622-b266-e2d6fb39931a"


def dynamic_daemon(node: Node, profile: Path, forks: ForkServer) -> Daemon:
    return Daemon(node, node.cli_args(str(profile), "--mig-mode", "dynamic",
                                      "--mock-state", str(node.mig_state)), forks)


def converged(node: Node, claim: Claim, placement: tuple[int, int]) -> str:
    """Check the node after a restart; returns 'prepared' or 'rolled back'."""
    loaded = checkpoint.load(node.checkpoint)  # readable, or this raises
    assert loaded is not None
    record = loaded.claims.get(claim.uid)
    assert leftovers(node.cdi_root, node.plugin_dir) == []
    specs = cdi_specs(node.cdi_root)
    if record is None:
        assert live_mig(node.mig_state) == {}
        assert specs == {}
        return "rolled back"
    assert record.state == "PrepareCompleted"
    assert live_mig(node.mig_state) == {GPU0: [(*placement, 1)]}
    assert set(specs) == {claim.uid} and cdi_problems(specs[claim.uid]) == []
    return "prepared"


def test_sigkill_while_preparing_dynamic_mig_always_converges(node: Node,
                                                              forks: ForkServer) -> None:
    profile = mig_profile(node.root / "mig.yaml", base="h100-80gb-hbm3", gpus=(0,))
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    daemon = dynamic_daemon(node, profile, forks)
    # how long one preparation takes: the window the kills are spread over
    calibration = make_claim(node.local, [result("gpu-0-mig-1g10gb-0")])
    began = time.perf_counter()
    daemon.kubelet.prepare([calibration])
    window = (time.perf_counter() - began) * 1.5
    daemon.kubelet.unprepare([calibration])
    outcomes: Counter[str] = Counter()
    names = list(DEVICES)
    for i in range(KILLS):
        device = names[i % len(names)]
        claim = make_claim(node.local, [result(device, request="mig")])
        # the kubelet's call, sent without waiting for the answer
        pending = daemon.kubelet.send("NodePrepareResources", [claim])
        time.sleep(rng.uniform(0, window))
        assert daemon.send(signal.SIGKILL) == -signal.SIGKILL
        failure = pending.exception(timeout=10)  # answered before the kill, or cut off
        acknowledged = failure is None and pending.result().claims[claim.uid].error == ""
        daemon.kubelet.close()
        daemon = dynamic_daemon(node, profile, forks)
        outcome = converged(node, claim, DEVICES[device])
        assert outcome == "prepared" or not acknowledged, "an answered prepare was lost"
        outcomes[outcome] += 1
        if outcome == "prepared":
            assert daemon.kubelet.unprepare([claim]) == {claim.uid: ""}
        assert live_mig(node.mig_state) == {}, f"kill {i} (seed {seed})"
    assert daemon.stop() == 0
    print(f"seed {seed}, window {window * 1000:.1f} ms: {dict(outcomes)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_sigterm_the_kernel_hands_to_another_thread_still_stops_the_plugin(
        node: Node) -> None:
    """A process-directed signal may go to any thread; Python handles it in the main one."""
    daemon = Daemon(node, node.cli_args("l4-8x"))
    others = [int(t) for t in os.listdir(f"/proc/{daemon.pid}/task") if int(t) != daemon.pid]
    assert others, "the plugin runs gRPC threads"
    assert ctypes.CDLL(None, use_errno=True).tgkill(daemon.pid, others[0],
                                                    signal.SIGTERM) == 0
    began = time.monotonic()
    assert daemon.wait() == 0 and time.monotonic() - began < 10
    assert not node.registration_socket.exists() and not node.dra_socket.exists()


def test_sigterm_removes_the_sockets_and_keeps_the_slices(node: Node) -> None:
    port = free_port()
    daemon = Daemon(node, [*node.cli_args("l4-8x"), "--metrics-port", str(port),
                           "--log-format", "json"])
    claim = make_claim(node.local, [result("gpu-3")])
    assert daemon.kubelet.prepare([claim])[claim.uid].error == ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert "gpu_dra_published_devices 8.0" in metrics
    assert 'gpu_dra_claims_total{operation="prepare",result="success"} 1.0' in metrics
    assert daemon.stop() == 0
    assert not node.registration_socket.exists() and not node.dra_socket.exists()
    assert node.slices()
    assert set(cdi_specs(node.cdi_root)) == {claim.uid}  # prepared claims outlive the plugin
    lines = [json.loads(line) for line in daemon.output().splitlines()]
    assert any(line.get("claim") == claim.uid and "prepared" in line["msg"] for line in lines)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda path: path.write_text("{not json"), "line 1: not JSON"),
    (lambda path: path.write_text("[" * 5000 + "]" * 5000), "nested deeper than 100 levels"),
    (lambda path: path.write_bytes(b'{"claims": {"\xff": 1}}'), "not UTF-8 text"),
    (_fifo, "not a regular file"),
    (lambda path: path.write_text(json.dumps({"claims": {f"{uuid.uuid4()}\n": {
        "namespace": "default", "name": "c", "state": "PrepareCompleted"}}})),
     "the key is not a claim UID"),
], ids=["not-json", "deep", "binary", "fifo", "uid-with-newline"])
def test_a_damaged_checkpoint_is_reported_in_one_line(node: Node, damage: Callable[[Path], None],
                                                      problem: str) -> None:
    node.plugin_dir.mkdir(parents=True)
    damage(node.checkpoint)
    done = subprocess.run([sys.executable, "-m", "driver.cli", *node.cli_args("l4-8x")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gpu-dra plugin: checkpoint {node.checkpoint}:")
    assert problem in last
    assert "restore the file" in last and "move it away" not in last  # nothing destructive
    assert "Traceback" not in done.stderr


def test_a_checkpoint_of_another_schema_version_is_read_and_kept(node: Node) -> None:
    first = Daemon(node, node.cli_args("l4-8x"))
    claim = make_claim(node.local, [result("gpu-1")])
    answer = first.kubelet.prepare([claim])
    first.stop()
    data = json.loads(node.checkpoint.read_text())
    data["schemaVersion"] = 7
    data["futureSetting"] = {"x": 1}
    data["claims"][claim.uid]["futureField"] = [1, 2]
    node.checkpoint.write_text(json.dumps(data))
    second = Daemon(node, node.cli_args("l4-8x"))
    assert second.kubelet.prepare([claim]) == answer
    other = make_claim(node.local, [result("gpu-2")])
    second.kubelet.prepare([other])  # a write
    second.stop()
    written = json.loads(node.checkpoint.read_text())
    assert written["futureSetting"] == {"x": 1}
    assert written["claims"][claim.uid]["futureField"] == [1, 2]
    assert (node.cdi_root / cdi.spec_file_name(DRIVER, other.uid)).exists()
