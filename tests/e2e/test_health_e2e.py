"""A GPU that fails while `gpu-dra plugin` runs, as the cluster sees it: the plugin on a
mock dgx-h100 (dynamic MIG) publishes its slices to the real API server; `gpu-dra mock
inject --xid 79` on GPU 3 makes the node's ResourceSlice carry a `gpu.dra.dev/xid=79`
NoSchedule taint on gpu-3 and every gpu-3 MIG device within seconds; the real
kube-scheduler then gives whole-GPU claims every other GPU and leaves one more claim
unschedulable; `--recover` removes the taints (default settings) and that claim gets
gpu-3.

The inject-to-taint and recover-to-untaint times on the API server are printed (run with
``-s`` to see them); only generous bounds are asserted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driver.devcluster.controlplane import ComponentError, LocalCluster
from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.kube.api import api_request
from tests.support.apiserver import (
    SLICES,
    ControlPlane,
    wait_for,
)
from tests.support.claims import Claims
from tests.support.plugin import short_tmp

REPO = Path(__file__).resolve().parents[2]
DRIVER = "gpu.dra.dev"
MACHINE = "dgx-h100"  # 8 H100s, minors 0-7
SICK = 3
XID_79 = {"key": f"{DRIVER}/xid", "value": "79", "effect": "NoSchedule"}
TAINT_BOUND_S = 10.0  # the target is 1 s; generous for a loaded machine
UNTAINT_BOUND_S = 15.0  # 10 s with the default 5 s check interval, plus the write
POLL = 0.02


class HealthNode:
    """A fake Node and `gpu-dra plugin --mock dgx-h100 --mig-mode dynamic --mock-state F`
    publishing its slices to the API server (no kubelet: nothing is prepared here)."""

    def __init__(self, control_plane: ControlPlane, name: str, root: Path) -> None:
        self.api, self.name = control_plane.api, name
        folders = PluginFolders(root)
        self.state = folders.mig_state
        registry = root / "registry"
        registry.mkdir()
        self.plugin = PluginDaemon(folders.plugin_args(
            node=name, driver=DRIVER, kubeconfig=control_plane.kubeconfig,
            registry_dir=registry, mock=MACHINE, mig_mode="dynamic", mock_state=self.state),
            folders.plugin_log)

    def inject(self, *fault: str) -> None:
        """`gpu-dra mock inject --gpu 3 <fault>`, as an admin or a check would run it."""
        done = subprocess.run([sys.executable, "-m", "driver.cli", "mock", "inject",
                               "--mock-state", str(self.state), "--gpu", str(SICK), *fault],
                              capture_output=True, text=True, cwd=REPO, timeout=60,
                              check=False)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr

    def devices(self) -> dict[str, dict[str, Any]] | None:
        """The node's published devices by name, as the API server has them, when its pool
        is complete (all its slices, of one generation, as the scheduler takes it); None
        while it is not. ComponentError at once if the plugin exited."""
        self.plugin.check_alive()
        items = api_request(self.api, "GET", SLICES, query={
            "fieldSelector": f"spec.nodeName={self.name},spec.driver={DRIVER}"}
        ).expect(200)["items"]
        pools = {(s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"])
                 for s in items}
        if len(pools) != 1 or next(iter(pools))[1] != len(items):
            return None
        return {d["name"]: d for s in items for d in s["spec"].get("devices", [])}

    def taints(self) -> dict[str, list[dict[str, str]]] | None:
        """Each tainted device's taints (key, value, effect); None while the pool is not
        complete (a write in progress)."""
        devices = self.devices()
        if devices is None:
            return None
        return {name: [{k: t.get(k, "") for k in ("key", "value", "effect")}
                       for t in d["taints"]]
                for name, d in devices.items() if d.get("taints")}

    def timed(self, ok: Any, what: str, bound: float) -> float:
        """Seconds until ``ok()`` held (polled every 20 ms), failing after ``bound``."""
        begin = time.monotonic()
        wait_for(ok, what, timeout=bound, interval=POLL, fatal=(ComponentError,))
        return time.monotonic() - begin


@pytest.fixture
def health_node(control_plane: ControlPlane, fake_node: Any) -> Iterator[HealthNode]:
    """The node with its slices published; at the end the plugin is stopped, its log tail
    printed (shown when the test fails) and the node's slices deleted."""
    with short_tmp() as root:
        node = HealthNode(control_plane, fake_node(), root)
        try:
            wait_for(node.devices, f"{node.name}'s ResourceSlices", fatal=(ComponentError,))
            yield node
        finally:
            code = node.plugin.stop()
            print(f"--- gpu-dra plugin on {node.name} (exit {code}) ---\n{node.plugin.tail()}")
            api_request(control_plane.api, "DELETE", SLICES, query={
                "fieldSelector": f"spec.nodeName={node.name}"}).expect(200, 404)


def test_xid_79_taints_gpu_3_in_the_api_server_the_scheduler_avoids_it_until_recovered(
        control_plane: ControlPlane, scheduler: LocalCluster,
        controller_manager: LocalCluster, device_classes: None, namespace: str,
        health_node: HealthNode) -> None:
    node = health_node
    devices = node.devices() or {}
    gpus = sorted(name for name, d in devices.items()
                  if d["attributes"]["type"] == {"string": "gpu"})
    sick_migs = sorted(name for name in devices if name.startswith(f"gpu-{SICK}-mig-"))
    assert len(gpus) == 8 and f"gpu-{SICK}" in gpus and sick_migs, sorted(devices)
    assert node.taints() == {}

    begin = time.monotonic()
    node.inject("--xid", "79")
    recorded = time.monotonic() - begin
    taint_s = recorded + node.timed(
        lambda: set(node.taints() or {}) >= {f"gpu-{SICK}", *sick_migs},
        "gpu-3 and its MIG devices to be tainted in the API server", TAINT_BOUND_S)
    taints = node.taints() or {}
    assert set(taints) == {f"gpu-{SICK}", *sick_migs}, sorted(taints)  # no other GPU
    assert all(XID_79 in device_taints for device_taints in taints.values()), taints
    print(f"\ninject --xid 79 to taint in the API server: {taint_s:.2f}s "
          f"(the inject command itself {recorded:.2f}s)")

    claims = Claims(control_plane.api, namespace, node.name)
    healthy = [f"claim-{i}" for i in range(len(gpus) - 1)]
    for name in healthy:
        claims.request(name)
    got = sorted(d for name in healthy for d in claims.wait_allocated(name))
    assert got == sorted(g for g in gpus if g != f"gpu-{SICK}")
    claims.request("waits")
    said = claims.wait_unschedulable("waits")
    print(f"the scheduler on the claim left over: {said}")

    begin = time.monotonic()
    node.inject("--recover")
    recorded = time.monotonic() - begin
    untaint_s = recorded + node.timed(lambda: node.taints() == {},
                                      "gpu-3's taints to leave the API server", UNTAINT_BOUND_S)
    print(f"inject --recover to untainted in the API server: {untaint_s:.2f}s "
          f"(the inject command itself {recorded:.2f}s)")
    assert claims.wait_allocated("waits") == [f"gpu-{SICK}"]
