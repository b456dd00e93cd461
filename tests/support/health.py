"""Watching a running plugin's GPU health from outside, as a user or the kubelet does: the
taints in its local slice files, the reports of one NodeWatchResources stream, and (a
`HealthNode`) the taints in the API server. Shared by the health integration and e2e
tests and the health benchmarks."""

from __future__ import annotations

import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from driver._proto.drahealth_v1 import api_pb2 as health_v1
from driver._proto.drahealth_v1 import api_pb2_grpc as health_v1_grpc
from driver.devcluster.controlplane import ComponentError
from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.kube.api import api_request
from tests.support.apiserver import SLICES, ControlPlane, wait_for
from tests.support.plugin import Daemon

REPO = Path(__file__).resolve().parents[2]
DRIVER = "gpu.dra.dev"
MACHINE = "dgx-h100"  # 8 H100s, minors 0-7
SICK = 3  # the GPU a HealthNode's faults go to
POLL = 0.02


def written_taints(local: Path, gpu: int = 3) -> tuple[dict[str, list[dict[str, Any]]], float]:
    """Taints by device name, of the GPU and its MIG devices, as the slice files under the
    local directory say, and when the newest file that has any of them was written (0:
    none)."""
    found, written = {}, 0.0
    for path in sorted((local / "resourceslices").glob("*.yaml")):
        try:
            mtime = path.stat().st_mtime
            obj = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        except (OSError, yaml.YAMLError):
            continue  # replaced while read: the next poll reads it
        for device in (obj or {}).get("spec", {}).get("devices", []):
            if device.get("taints") and (device["name"] == f"gpu-{gpu}"
                                         or device["name"].startswith(f"gpu-{gpu}-mig-")):
                found[device["name"]] = device["taints"]
                written = max(written, mtime)
    return found, written


def wait_until(ok: Callable[[], bool], bound: float, step: float = 0.01) -> float:
    """Seconds until `ok()` held; fails after `bound`."""
    begin = time.monotonic()
    while not ok():
        assert time.monotonic() - begin < bound, f"not within {bound}s"
        time.sleep(step)
    return time.monotonic() - begin


def first_tainted(local: Path, gpu: int = 3, bound: float = 10.0) -> float:
    """When the slice files were written with the GPU's taints: the write seen first (the
    next one comes a second later at the earliest)."""
    written = 0.0

    def tainted() -> bool:
        nonlocal written
        written = written_taints(local, gpu)[1]
        return written > 0

    wait_until(tainted, bound)
    return written


class Stream:
    """One v1 NodeWatchResources stream; the reports for one device in a queue, each with
    the wall-clock time it arrived."""

    def __init__(self, daemon: Daemon, device: str = "gpu-3") -> None:
        stub = health_v1_grpc.DRAResourceHealthStub(daemon.kubelet.dra_channel)
        self.call = stub.NodeWatchResources(health_v1.NodeWatchResourcesRequest(), timeout=600)
        self.device = device
        self.reports: queue.Queue[tuple[float, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.reports.put((time.time(), next(d for d in response.devices
                                                    if d.device.device_name == self.device)))
        except Exception:  # cancelled at the end
            pass

    def wait_for(self, health: int, bound: float) -> tuple[float, Any]:
        """The next report with `health` within `bound` seconds, and when it arrived."""
        deadline = time.monotonic() + bound
        while True:
            arrived, report = self.reports.get(timeout=max(0.01, deadline - time.monotonic()))
            if report.health == health:
                return arrived, report


def inject(state: Path, gpu: int, *fault: str) -> None:
    """`gpu-dra mock inject --mock-state STATE --gpu GPU <fault>`, as an admin or a check
    would run it."""
    done = subprocess.run([sys.executable, "-m", "driver.cli", "mock", "inject",
                           "--mock-state", str(state), "--gpu", str(gpu), *fault],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def p50_p99(seconds: list[float]) -> dict[str, float]:
    """Milliseconds: the median and the 99th percentile (nearest rank) of `seconds`."""
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(p99 * 1000, 1)}


class HealthNode:
    """A fake Node and `gpu-dra plugin --mock dgx-h100 --mig-mode dynamic --mock-state F`
    publishing its slices to the API server; registered with the kubelet stand-in's
    ``registry`` when given (pods are prepared then), else with no kubelet."""

    def __init__(self, control_plane: ControlPlane, name: str, root: Path,
                 registry: Path | None = None, *extra: str) -> None:
        self.api, self.name = control_plane.api, name
        self.folders = folders = PluginFolders(root)
        self.state = folders.mig_state
        if registry is None:
            registry = root / "registry"
            registry.mkdir()
        self.plugin = PluginDaemon([*folders.plugin_args(
            node=name, driver=DRIVER, kubeconfig=control_plane.kubeconfig,
            registry_dir=registry, mock=MACHINE, mig_mode="dynamic", mock_state=self.state),
            *extra], folders.plugin_log)

    def inject(self, *fault: str) -> None:
        """`gpu-dra mock inject --gpu 3 <fault>`, as an admin or a check would run it."""
        inject(self.state, SICK, *fault)

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
