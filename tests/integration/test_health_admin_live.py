"""An admin's hand on a running `gpu-dra plugin --mock dgx-h100` in local mode, through
`gpu-dra health` as they would run it: out-of-service taints gpu-3 and its MIG devices
with the reason and survives a plugin restart; `return` gives it back; `clear` forgets
an XID the monitor found (what the GPU still reports is found again); `status` shows
what is published; a GPU the node does not have is refused."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.forkserver import ForkServer
from tests.support.plugin import Daemon, Node

REPO = Path(__file__).resolve().parents[2]
DRIVER = "gpu.dra.dev"
BOUND_S = 15.0  # the admin file is read every second; generous for a loaded machine


def gpu_dra(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "driver.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)


def health(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return gpu_dra("health", *args, "--plugin-data-dir", str(node.plugin_dir))


def gpu3_taints(node: Node) -> dict[str, list[dict[str, Any]]]:
    """Taints (key, value, effect) by device name, of gpu-3 and its MIG devices."""
    found = {}
    for path in sorted((node.local / "resourceslices").glob("*.yaml")):
        try:
            obj = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        except (OSError, yaml.YAMLError):
            continue  # replaced while read: the next poll reads it
        for device in (obj or {}).get("spec", {}).get("devices", []):
            if device.get("taints") and (device["name"] == "gpu-3"
                                         or device["name"].startswith("gpu-3-mig-")):
                found[device["name"]] = [{k: t.get(k) for k in ("key", "value", "effect")}
                                         for t in device["taints"]]
    return found


def wait_until(ok: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not ok():
        assert time.monotonic() < deadline, f"not within {BOUND_S}s: {what}"
        time.sleep(0.05)


@pytest.fixture
def plugin(node: Node, forks: ForkServer, tmp_path: Path) -> Iterator[Callable[[], Daemon]]:
    started: list[Daemon] = []

    def start() -> Daemon:
        daemon = Daemon(node, node.cli_args(
            "dgx-h100", "--mock-state", str(tmp_path / "mock-state.json"), "--mig-mode",
            "dynamic", "--health-check-interval", "0.5"), forks)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        with contextlib.suppress(ProcessLookupError):  # stopped by the test
            daemon.stop()


OUT = {"key": f"{DRIVER}/out-of-service", "value": "RMA-42", "effect": "NoSchedule"}


def test_out_of_service_until_returned_across_a_restart(
        node: Node, plugin: Callable[[], Daemon]) -> None:
    daemon = plugin()
    done = health(node, "out-of-service", "--gpu", "3", "--reason", "RMA 42")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    wait_until(lambda: "gpu-3" in gpu3_taints(node), "the out-of-service taint")
    taints = gpu3_taints(node)
    assert any(name.startswith("gpu-3-mig-") for name in taints)
    assert all(ts == [OUT] for ts in taints.values()), taints
    status = health(node, "status")
    assert status.returncode == 0
    assert "unhealthy" in status.stdout and "out-of-service=RMA-42:NoSchedule" in status.stdout
    assert "3 since" in status.stdout and "(RMA 42)" in status.stdout

    daemon.stop()
    plugin()  # a restart keeps the GPU out: the request is in the file
    wait_until(lambda: gpu3_taints(node).get("gpu-3") == [OUT], "out of service again")

    assert health(node, "return", "--gpu", "3").returncode == 0
    wait_until(lambda: gpu3_taints(node) == {}, "the taint gone")
    doc = json.loads(health(node, "status", "-o", "json").stdout)
    assert {g["gpu"]: g["status"] for g in doc["published"]["gpus"]}[3] == "healthy"


def test_clear_forgets_what_the_monitor_found(
        node: Node, plugin: Callable[[], Daemon], tmp_path: Path) -> None:
    daemon = plugin()
    injected = gpu_dra("mock", "inject", "--mock-state", str(tmp_path / "mock-state.json"),
                       "--gpu", "3", "--xid", "79")
    assert injected.returncode == 0, injected.stderr
    wait_until(lambda: {t["key"] for t in gpu3_taints(node).get("gpu-3", [])} == {
        f"{DRIVER}/xid", f"{DRIVER}/recovery"}, "the XID and the reboot it asks for")
    uuid = next(g["uuid"] for g in json.loads(health(node, "status", "-o", "json").stdout)
                ["published"]["gpus"] if g["gpu"] == 3)
    assert health(node, "clear", "--gpu", uuid).returncode == 0  # by UUID this time
    # the XID is forgotten; the reboot the driver still asks for is found again
    wait_until(lambda: [t["key"] for t in gpu3_taints(node).get("gpu-3", [])] == [
        f"{DRIVER}/recovery"], "the XID taint cleared")
    assert "manual clear" in daemon.log.read_text()


def test_a_gpu_this_node_does_not_have_is_refused(
        node: Node, plugin: Callable[[], Daemon]) -> None:
    plugin()
    wait_until(lambda: (node.plugin_dir / "health.json").exists(), "health.json")
    done = health(node, "out-of-service", "--gpu", "9")
    assert done.returncode == 2
    assert "no GPU '9' on this node" in done.stderr and "\n" not in done.stderr.strip()
    assert not (node.plugin_dir / "health-admin.json").exists()
