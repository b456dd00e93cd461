"""Re-discovery in a running plugin (local mode, mock dgx-h100): a GPU that `gpu-dra mock
inject --remove` takes out of NVML's enumeration leaves the slice file with its MIG
devices, and `--add` brings them back, on the timer or at once on SIGHUP; a pass that
finds nothing new writes nothing; a claim prepared on a GPU that vanished is still
unprepared, its CDI spec removed; an admin's static MIG layout change reaches the slices;
a failing NVML changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver._proto.drahealth_v1 import api_pb2 as health_v1
from driver._proto.drahealth_v1 import api_pb2_grpc as health_v1_grpc
from driver.nvml.faults import Fault
from driver.nvml.mock import inject as record
from driver.plugin.mig import MigManager
from driver.resourceslice.build import mig_device_name
from tests.support.forkserver import ForkServer
from tests.support.plugin import Daemon, Node, Start, cdi_specs, make_claim, result

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 10.0  # generous for a loaded machine: a pass every 0.2 s, a write within 1 s
QUIET_S = 1.5  # longer than a periodic pass and the write after it would take
PUSH_BOUND_S = 3.0  # a change pushed to a health stream; the periodic re-send is 10 s apart


def inject(state: Path, *fault: str) -> None:
    done = subprocess.run([sys.executable, "-m", "driver.cli", "mock", "inject",
                           "--mock-state", str(state), "--gpu", "3", *fault],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def devices(node: Node) -> set[str]:
    """The device names in the node's slice files."""
    return {d["name"] for s in node.slices() for d in s["spec"].get("devices", [])}


def gpu3(node: Node) -> set[str]:
    return {name for name in devices(node) if name == "gpu-3" or name.startswith("gpu-3-")}


def slice_files(node: Node) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted((node.local / "resourceslices").glob("*.yaml"))}


def wait_until(ok: Callable[[], bool], bound: float = BOUND_S) -> None:
    deadline = time.monotonic() + bound
    while not ok():
        assert time.monotonic() < deadline, f"not within {bound}s"
        time.sleep(0.05)


@contextmanager
def plugin(node: Node, forks: ForkServer, state: Path, interval: str, *extra: str
           ) -> Iterator[Daemon]:
    """`gpu-dra plugin --mock dgx-h100 --mock-state STATE` (dynamic MIG), re-discovering
    every `interval` seconds."""
    daemon = Daemon(node, node.cli_args("dgx-h100", "--mock-state", str(state), "--mig-mode",
                                        "dynamic", "--rediscover-interval", interval, *extra),
                    forks)
    try:
        yield daemon
    finally:
        daemon.stop()


def test_a_removed_gpu_leaves_the_slices_and_comes_back_when_added(
        node: Node, forks: ForkServer, tmp_path: Path) -> None:
    state = tmp_path / "mock-state.json"
    with plugin(node, forks, state, "0.2") as daemon:
        published = gpu3(node)
        assert "gpu-3" in published and any(name.startswith("gpu-3-mig-") for name in published)
        others = devices(node) - published

        inject(state, "--remove")
        wait_until(lambda: gpu3(node) == set())
        assert devices(node) == others
        assert "re-discovery: GPU 3 gone (GPU-68a37c14-cba3-5893-8527-70e1ada18b19)" \
            in daemon.log.read_text()

        inject(state, "--add")
        wait_until(lambda: gpu3(node) == published)
        assert "re-discovery: GPU 3 new (GPU-68a37c14" in daemon.log.read_text()


def test_a_lost_gpu_stays_published_tainted_until_it_answers_again(
        node: Node, forks: ForkServer, tmp_path: Path) -> None:
    """Lost is not removed: NVML still enumerates the GPU, so re-discovery keeps it and the
    monitor's taint says why; when it answers again the taint goes."""
    state = tmp_path / "mock-state.json"
    with plugin(node, forks, state, "0.2", "--health-check-interval", "0.2") as daemon:
        published = gpu3(node)
        record(state, 3, Fault("lost"))
        wait_until(lambda: "gpu.dra.dev/gpu-lost" in lost_taints(node))
        time.sleep(QUIET_S)  # several passes
        assert gpu3(node) == published and "gpu.dra.dev/gpu-lost" in lost_taints(node)
        record(state, 3, Fault("recover"))
        wait_until(lambda: lost_taints(node) == set())
        assert "re-discovery:" not in daemon.log.read_text()


def lost_taints(node: Node) -> set[str]:
    """The taint keys on gpu-3 in the slice files."""
    return {t["key"] for s in node.slices() for d in s["spec"].get("devices", [])
            if d["name"] == "gpu-3" for t in d.get("taints", [])}


def test_sighup_rediscovers_at_once_and_nothing_new_writes_nothing(
        node: Node, forks: ForkServer, tmp_path: Path) -> None:
    state = tmp_path / "mock-state.json"
    with plugin(node, forks, state, "0", "-v", "1") as daemon:
        before = slice_files(node)
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: "re-discovery: nothing changed" in daemon.log.read_text())
        time.sleep(QUIET_S)  # a write would have come by now
        assert slice_files(node) == before  # not even rewritten with the same content

        record(state, 3, Fault("remove"))
        time.sleep(QUIET_S)  # no timer: nothing happens until asked
        assert "gpu-3" in gpu3(node)
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: gpu3(node) == set())


def test_a_claim_prepared_on_a_gpu_that_vanished_is_still_unprepared(
        node: Node, forks: ForkServer, tmp_path: Path) -> None:
    """A dynamic MIG device on GPU 3: once the GPU is gone there is nothing to destroy, and
    the claim's record and CDI spec go; a new claim for the GPU is refused."""
    state = tmp_path / "mock-state.json"
    with plugin(node, forks, state, "0") as daemon:
        mig = "gpu-3-mig-1g10gb-0"
        claim = make_claim(node.local, [result(mig)])
        answer = daemon.kubelet.prepare([claim])[claim.uid]
        assert answer.error == ""
        assert claim.uid in node.records() and len(cdi_specs(node.cdi_root)) == 1

        record(state, 3, Fault("remove"))
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: gpu3(node) == set())
        assert claim.uid in node.records()  # still held: the kubelet unprepares it

        assert daemon.kubelet.unprepare([claim]) == {claim.uid: ""}
        assert node.records() == {} and cdi_specs(node.cdi_root) == {}
        late = make_claim(node.local, [result("gpu-3")])
        assert "not published" in daemon.kubelet.prepare([late])[late.uid].error


def streamed(response: Any) -> set[str]:
    """The device names of one NodeWatchResources report."""
    return {d.device.device_name for d in response.devices}


def test_a_prepare_in_flight_finishes_on_what_was_published_before_the_swap(
        node: Node, start: Start) -> None:
    """A pass that found GPU 3 gone waits for the prepare of a claim on gpu-3 that is in
    flight (it sees one index from plan to finish), then swaps; the health stream drops
    gpu-3 at once; the claim unprepares."""
    running = start(rediscover_interval=0)
    plugin, state = running.plugin, running.plugin.state
    acting, release = threading.Event(), threading.Event()
    apply = state.effects.apply

    def slow_apply(*args: Any) -> Any:
        acting.set()
        release.wait(BOUND_S)
        return apply(*args)

    state.effects.apply = slow_apply
    claim = make_claim(node.local, [result("gpu-3")])
    call = running.kubelet.send("NodePrepareResources", [claim])
    assert acting.wait(BOUND_S)
    stream = health_v1_grpc.DRAResourceHealthStub(running.kubelet.dra_channel) \
        .NodeWatchResources(health_v1.NodeWatchResourcesRequest(), timeout=60)
    assert "gpu-3" in streamed(next(stream))
    running.provider.nvml.inject(3, Fault("remove"))
    swap = threading.Thread(target=plugin.rediscover)
    swap.start()
    swap.join(QUIET_S)
    assert swap.is_alive() and "gpu-3" in state.published.index  # waits for the call

    release.set()
    assert call.result().claims[claim.uid].error == ""
    swap.join(BOUND_S)
    assert not swap.is_alive() and "gpu-3" not in state.published.index
    swapped = time.monotonic()
    while "gpu-3" in streamed(next(stream)):  # reports sent before the swap
        pass
    assert time.monotonic() - swapped < PUSH_BOUND_S  # pushed, not the periodic re-send
    stream.cancel()
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert node.records() == {}


def test_an_admins_static_mig_change_reaches_the_slices(node: Node, start: Start,
                                                        tmp_path: Path) -> None:
    """MIG mode turned on and a MIG device made on GPU 2 behind the plugin's back (static
    MIG mode): the next pass publishes the MIG device instead of the whole GPU; another
    pass writes nothing."""
    running = start(mock_state=tmp_path / "state.json", rediscover_interval=0)
    plugin = running.plugin
    assert "gpu-2" in devices(node)
    gpu = next(g for g in plugin.state.published.inventory.gpus if g.minor == 2)
    profile = next(p for p in gpu.mig_profiles if p.name.startswith("1g."))
    MigManager(running.provider).create(gpu, profile, profile.placements[0])

    assert "GPU 2 MIG mode off -> on" in plugin.rediscover()
    mig = mig_device_name(gpu, profile.name, profile.placements[0])
    wait_until(lambda: mig in devices(node) and "gpu-2" not in devices(node))
    writes = plugin.metrics.registry.get_sample_value("gpu_dra_resourceslice_writes_total")
    assert plugin.rediscover() == []
    time.sleep(QUIET_S)
    assert plugin.metrics.registry.get_sample_value(
        "gpu_dra_resourceslice_writes_total") == writes


def test_a_failing_nvml_changes_nothing(node: Node, start: Start,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    running = start(rediscover_interval=0)
    plugin = running.plugin
    published = plugin.state.published

    def fails() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(running.provider.nvml, "nvmlDeviceGetCount", fails)
    assert plugin.rediscover() == []
    assert plugin.state.published is published
    assert plugin.metrics.registry.get_sample_value(
        "gpu_dra_rediscoveries_total", {"result": "failed"}) == 1
