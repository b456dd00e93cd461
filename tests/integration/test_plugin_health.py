"""A running `gpu-dra plugin --mock dgx-h100 --mock-state F` in local mode follows the GPU
faults `gpu-dra mock inject` records: XID 79 on gpu 3 taints gpu-3 and its MIG devices
in the slice files and turns the health stream's gpu-3 UNHEALTHY with the cause; a
`--recover` gives the GPU back (taints gone, HEALTHY) within 10 s with the default
settings; an informational XID (13) gives no NoSchedule taint."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from driver._proto.drahealth_v1 import api_pb2 as health_v1
from tests.support.forkserver import ForkServer
from tests.support.health import Stream, wait_until, written_taints
from tests.support.plugin import Daemon, Node

REPO = Path(__file__).resolve().parents[2]
DRIVER = "gpu.dra.dev"
TAINT_BOUND_S = 5.0  # the target is 1 s; generous for a loaded machine
RECOVER_BOUND_S = 10.0  # the bound with the default 5 s check interval


def inject(state: Path, *fault: str) -> None:
    done = subprocess.run([sys.executable, "-m", "driver.cli", "mock", "inject",
                           "--mock-state", str(state), "--gpu", "3", *fault],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def gpu3_taints(node: Node) -> dict[str, list[dict[str, Any]]]:
    """Taints by device name, of gpu-3 and its MIG devices, as the slice files say."""
    return written_taints(node.local)[0]


@pytest.fixture
def plugin(node: Node, forks: ForkServer, tmp_path: Path
           ) -> Iterator[Callable[..., tuple[Daemon, Path]]]:
    started: list[Daemon] = []

    def start(*extra: str) -> tuple[Daemon, Path]:
        state = tmp_path / "mock-state.json"
        daemon = Daemon(node, node.cli_args("dgx-h100", "--mock-state", str(state),
                                            "--mig-mode", "dynamic", *extra), forks)
        started.append(daemon)
        return daemon, state

    yield start
    for daemon in started:
        daemon.stop()


def test_xid_79_taints_gpu_3_and_its_mig_devices_and_recover_gives_it_back(
        node: Node, plugin: Callable[..., tuple[Daemon, Path]]) -> None:
    daemon, state = plugin()
    stream = Stream(daemon)
    assert stream.wait_for(health_v1.HEALTHY, 10)[1].message == ""
    assert gpu3_taints(node) == {}

    inject(state, "--xid", "79")
    wait_until(lambda: bool(gpu3_taints(node)), TAINT_BOUND_S)
    taints = gpu3_taints(node)
    assert "gpu-3" in taints and any(name.startswith("gpu-3-mig-") for name in taints)
    for device_taints in taints.values():
        assert {"key": f"{DRIVER}/xid", "value": "79", "effect": "NoSchedule"} in [
            {k: t[k] for k in ("key", "value", "effect")} for t in device_taints]
    _, report = stream.wait_for(health_v1.UNHEALTHY, TAINT_BOUND_S)
    assert "xid=79 (GPU has fallen off the bus):NoSchedule since" in report.message
    assert report.health_check_timeout_seconds > 0

    inject(state, "--recover")
    wait_until(lambda: gpu3_taints(node) == {}, RECOVER_BOUND_S)
    stream.wait_for(health_v1.HEALTHY, RECOVER_BOUND_S)

    inject(state, "--xid", "13")  # an application fault: the GPU is fine
    time.sleep(2.0)  # a NoSchedule taint would be written by now
    assert all(t["effect"] == "None" for ts in gpu3_taints(node).values() for t in ts)
    assert "GPU 3 (GPU-68a37c14-cba3-5893-8527-70e1ada18b19): xid set (XID 79: GPU has " \
        "fallen off the bus)" in daemon.log.read_text()
