"""MPS per claim in local mode, against the mock driver root's stand-in daemon
(`driver.nvml.mpsstandin`): a claim gets a daemon of its own that was told its limits,
its containers join it (the CDI spec's mount and env), its GPUs are in EXCLUSIVE_PROCESS
mode while it is prepared; the daemon survives a plugin killed with SIGKILL and is adopted
by the next start (which stops one no record explains), a daemon that dies or hangs is
started again and reported, a GPU reset to Default is put back in EXCLUSIVE_PROCESS, and
unprepare leaves no process, directory or compute mode behind."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver._proto.drahealth_v1 import api_pb2 as health_v1
from driver._proto.drahealth_v1 import api_pb2_grpc as health_v1_grpc
from driver.nvml.mock import compute_mode
from driver.nvml.mpsstandin import PID_FILE
from driver.plugin import checkpoint
from driver.plugin.driverfiles import nvml_library
from driver.plugin.mps import CONTAINER_PIPE
from tests.support.plugin import (
    Daemon,
    Node,
    Running,
    Start,
    cdi_specs,
    gpu_config,
    make_claim,
    opaque,
    result,
)

MPS = gpu_config(strategy="MPS", mpsConfig={
    "defaultActiveThreadPercentage": 30, "defaultPinnedDeviceMemoryLimit": "8Gi",
    "defaultPerDevicePinnedMemoryLimit": {"gpu-6": "512Mi"}})
ONE_GPU = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 30,
                                               "defaultPinnedDeviceMemoryLimit": "8Gi"})
EXCLUSIVE, DEFAULT = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS, pynvml.NVML_COMPUTEMODE_DEFAULT


@pytest.fixture(autouse=True)
def no_daemon_left(node: Node) -> Iterator[None]:
    """A test that fails leaves no stand-in daemon running."""
    yield
    for pid_file in (node.plugin_dir / "mps").glob(f"*/pipe/{PID_FILE}"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def mock_root(node: Node) -> Path:
    return node.plugin_dir / "mock-driver-root"


def control(node: Node, uid: str, command: str) -> str:
    """Ask the claim's daemon, as an admin would, through the stand-in client."""
    binary = mock_root(node) / "usr/local/nvidia/bin/nvidia-cuda-mps-control"
    done = subprocess.run([str(binary)], input=command + "\n", capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "CUDA_MPS_PIPE_DIRECTORY":
                               str(node.plugin_dir / "mps" / uid / "pipe")},
                          timeout=30, check=True)
    return done.stdout.strip()


def daemon_pid(node: Node, uid: str) -> int:
    return int((node.plugin_dir / "mps" / uid / "pipe" / PID_FILE).read_text())


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def compute_modes(nvml: Any, *uuids: str) -> list[int]:
    return [nvml.nvmlDeviceGetComputeMode(nvml.nvmlDeviceGetHandleByUUID(u)) for u in uuids]


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(e.split("=", 1) for e in entries if e)


def test_an_mps_claim_gets_a_daemon_with_its_limits_and_unprepare_leaves_nothing(
        node: Node, start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_DRA_TEST_SECRET", "plugin-only")
    running = start(mock_driver_root=mock_root(node))
    index = running.plugin.state.published.index
    gpu_1, gpu_6 = index["gpu-1"].gpu.uuid, index["gpu-6"].gpu.uuid
    claim = make_claim(node.local, [result("gpu-1"), result("gpu-6"), result("gpu-3", "solo")],
                       [opaque(MPS, requests=["gpu"])])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    pid = daemon_pid(node, claim.uid)
    assert alive(pid) and os.getsid(pid) not in (os.getsid(0), os.getpid())
    env = environment(pid)
    assert env["CUDA_VISIBLE_DEVICES"] == f"{gpu_1},{gpu_6}"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(node.plugin_dir / "mps" / claim.uid / "pipe")
    assert env["CUDA_MPS_LOG_DIRECTORY"] == str(node.plugin_dir / "mps" / claim.uid / "log")
    library = nvml_library(mock_root(node))
    assert env["LD_PRELOAD"] == str(library) and "GPU_DRA_TEST_SECRET" not in env
    shm = node.plugin_dir / "mps" / claim.uid / "shm"
    assert shm.stat().st_mode & 0o7777 == 0o1777  # as /dev/shm, for any user
    (shm / "probe").write_text("the claim's")  # the daemon's /dev/shm is the claim's own
    assert (Path(f"/proc/{pid}/root/dev/shm/probe")).read_text() == "the claim's"
    assert not Path("/dev/shm/probe").exists()
    assert control(node, claim.uid, "get_default_active_thread_percentage") == "30.0"
    assert control(node, claim.uid, "get_default_device_pinned_mem_limit 0") == "8G"
    assert control(node, claim.uid, "get_default_device_pinned_mem_limit 1") == "512M"
    assert compute_modes(running.provider.nvml, gpu_1, gpu_6) == [EXCLUSIVE, EXCLUSIVE]
    gpu_3 = index["gpu-3"].gpu.uuid
    assert compute_modes(running.provider.nvml, gpu_3) == [DEFAULT]  # not an MPS device

    spec = cdi_specs(node.cdi_root)[claim.uid]
    edits = {d["name"].removeprefix(f"{claim.uid}-"): d["containerEdits"]
             for d in spec["devices"]}
    pipe = str(node.plugin_dir / "mps" / claim.uid / "pipe")
    for name in ("gpu-1", "gpu-6"):
        assert edits[name]["env"] == [f"CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE}"]
        assert [(m["hostPath"], m["containerPath"]) for m in edits[name]["mounts"]] == \
            [(pipe, CONTAINER_PIPE), (str(shm), "/dev/shm")]
    assert "env" not in edits["gpu-3"] and "mounts" not in edits["gpu-3"]
    record = node.records()[claim.uid]
    assert {d.device: d.mps for d in record.devices} == {
        "gpu-1": str(node.plugin_dir / "mps" / claim.uid),
        "gpu-6": str(node.plugin_dir / "mps" / claim.uid), "gpu-3": None}

    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert not alive(pid)
    assert not (node.plugin_dir / "mps" / claim.uid).exists()
    assert compute_modes(running.provider.nvml, gpu_1, gpu_6) == [DEFAULT, DEFAULT]
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}


def test_a_daemon_that_dies_is_reported_and_started_again_with_its_limits(
        node: Node, start: Start) -> None:
    running = start(mock_driver_root=mock_root(node))
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    first = daemon_pid(node, claim.uid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    restarts = running.plugin.metrics.registry.get_sample_value
    while restarts("gpu_dra_mps_daemon_restarts_total") != 1:
        assert time.monotonic() < deadline, "the daemon was not started again"
        time.sleep(0.1)
    again = daemon_pid(node, claim.uid)
    assert again != first and alive(again)
    assert control(node, claim.uid, "get_default_active_thread_percentage") == "30.0"
    assert control(node, claim.uid, "get_default_device_pinned_mem_limit 0") == "8G"
    assert restarts("gpu_dra_mps_daemons", {"state": "running"}) == 1
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert not alive(again) and not (node.plugin_dir / "mps" / claim.uid).exists()


def health_reports(running: Running, device: str) -> queue.Queue[tuple[int, str]]:
    """The (health, message) of `device` in each report of a NodeWatchResources stream,
    read in the background until the plugin stops."""
    stub = health_v1_grpc.DRAResourceHealthStub(running.kubelet.dra_channel)
    call = stub.NodeWatchResources(health_v1.NodeWatchResourcesRequest(), timeout=120)
    reports: queue.Queue[tuple[int, str]] = queue.Queue()

    def read() -> None:
        with contextlib.suppress(Exception):  # cancelled at the end
            for response in call:
                reports.put(next((d.health, d.message) for d in response.devices
                                 if d.device.device_name == device))
    threading.Thread(target=read, daemon=True).start()
    return reports


def next_with(reports: queue.Queue[tuple[int, str]], health: int, bound: float) -> str:
    """The message of the next report with `health` within `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        got, message = reports.get(timeout=max(0.01, deadline - time.monotonic()))
        if got == health:
            return message


def test_a_down_daemon_makes_its_device_unhealthy_on_the_health_stream_until_it_answers(
        node: Node, start: Start) -> None:
    running = start(mock_driver_root=mock_root(node))
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    reports = health_reports(running, "gpu-2")
    assert next_with(reports, health_v1.HEALTHY, 10) == ""
    binary = mock_root(node) / "usr/local/nvidia/bin/nvidia-cuda-mps-control"
    mode = binary.stat().st_mode
    binary.chmod(mode & ~0o111)  # the daemon cannot be started again until it is back
    try:
        os.kill(daemon_pid(node, claim.uid), signal.SIGKILL)
        message = next_with(reports, health_v1.UNHEALTHY, 30)
    finally:
        binary.chmod(mode)
    assert message.startswith(f"MPS daemon of claim {claim.namespace}/{claim.name} "
                              f"({claim.uid}) is down: ")
    assert message.endswith("; starting it again")
    assert next_with(reports, health_v1.HEALTHY, 30) == ""
    assert control(node, claim.uid, "get_default_active_thread_percentage") == "30.0"
    restarts = running.plugin.metrics.registry.get_sample_value
    assert restarts("gpu_dra_mps_daemon_restarts_total") == 1
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}


def test_a_daemon_that_hangs_is_killed_and_started_again(node: Node, start: Start) -> None:
    running = start(mock_driver_root=mock_root(node))
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    hung = daemon_pid(node, claim.uid)
    os.kill(hung, signal.SIGSTOP)  # alive, but its socket answers nothing
    deadline = time.monotonic() + 60
    restarts = running.plugin.metrics.registry.get_sample_value
    while restarts("gpu_dra_mps_daemon_restarts_total") != 1:
        assert time.monotonic() < deadline, "the daemon was not started again"
        time.sleep(0.1)
    assert not alive(hung) and alive(daemon_pid(node, claim.uid))
    assert control(node, claim.uid, "get_default_active_thread_percentage") == "30.0"
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}


def test_a_gpu_reset_to_default_is_put_back_in_exclusive_process(node: Node, start: Start
                                                                 ) -> None:
    """A GPU reset puts the Default compute mode back while the daemon lives on: the next
    check sets EXCLUSIVE_PROCESS again (no restart), and unprepare still restores Default."""
    running = start(mock_driver_root=mock_root(node))
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    nvml, gpu_2 = running.provider.nvml, running.plugin.state.published.index["gpu-2"].gpu.uuid
    pid = daemon_pid(node, claim.uid)
    nvml.nvmlDeviceSetComputeMode(nvml.nvmlDeviceGetHandleByUUID(gpu_2), DEFAULT)
    deadline = time.monotonic() + 60
    while compute_modes(nvml, gpu_2) != [EXCLUSIVE]:
        assert time.monotonic() < deadline, "the GPU was not put back in EXCLUSIVE_PROCESS"
        time.sleep(0.1)
    assert daemon_pid(node, claim.uid) == pid
    restarts = running.plugin.metrics.registry.get_sample_value
    assert restarts("gpu_dra_mps_daemon_restarts_total") == 0
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert compute_modes(nvml, gpu_2) == [DEFAULT]


def test_unprepare_of_a_claim_whose_daemon_is_gone_succeeds(node: Node, start: Start) -> None:
    running = start(mock_driver_root=mock_root(node))
    gpu_2 = running.plugin.state.published.index["gpu-2"].gpu.uuid
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    os.kill(daemon_pid(node, claim.uid), signal.SIGKILL)
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert not (node.plugin_dir / "mps").exists() or \
        list((node.plugin_dir / "mps").iterdir()) == []
    assert compute_modes(running.provider.nvml, gpu_2) == [DEFAULT]


def test_a_daemon_that_does_not_start_fails_the_claim_and_undoes_everything(
        node: Node, start: Start) -> None:
    running = start(mock_driver_root=mock_root(node))
    gpu_2 = running.plugin.state.published.index["gpu-2"].gpu.uuid
    (mock_root(node) / "usr/local/nvidia/bin/nvidia-cuda-mps-control").unlink()
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert error == (f"MPS of claim {claim.uid}: nvidia-cuda-mps-control -d exited 1: "
                     "FileNotFoundError: [Errno 2] No such file or directory")
    assert compute_modes(running.provider.nvml, gpu_2) == [DEFAULT]
    assert list((node.plugin_dir / "mps").iterdir()) == []
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}


def test_mps_with_admin_access_or_another_mps_config_is_refused_before_any_effect(
        node: Node, start: Start) -> None:
    running = start(mock_driver_root=mock_root(node))
    admin = make_claim(node.local, [result("gpu-2", admin=True)], [opaque(ONE_GPU)])
    other = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 50})
    two = make_claim(node.local, [result("gpu-4"), result("gpu-5", "b")],
                     [opaque(ONE_GPU, requests=["gpu"]), opaque(other, requests=["b"])])
    answers = running.kubelet.prepare([admin, two])
    assert answers[admin.uid].error == (
        f"ResourceClaim ns/{admin.name}: device gpu-2 (request gpu): sharing strategy MPS "
        "(status.allocation.devices.config[0]) is refused: an adminAccess user does not own "
        "the GPU's settings")
    assert answers[two.uid].error == ("a claim has one MPS daemon: its devices gpu-4, gpu-5 "
                                      "must have one mpsConfig")
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}
    assert not (node.plugin_dir / "mps").exists()


def test_a_killed_plugin_leaves_the_daemon_running_and_the_next_start_adopts_it(
        node: Node) -> None:
    args = node.cli_args("dgx-h100", "--mock-state", str(node.mig_state))
    plugin = Daemon(node, args)
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    try:
        assert plugin.kubelet.prepare([claim])[claim.uid].error == ""
    finally:
        plugin.stop(signal.SIGKILL)
    pid = daemon_pid(node, claim.uid)
    assert alive(pid)
    gpu_2 = "GPU-6a97cacc-c0f8-54b8-97b2-00b046941b54"  # dgx-h100's
    assert compute_mode(node.mig_state, gpu_2) == EXCLUSIVE
    plugin = Daemon(node, args, log_name="plugin-2.log")
    try:
        deadline = time.monotonic() + 30
        while f"MPS daemon {pid} of ResourceClaim ns/{claim.name} is running" \
                not in plugin.output():
            assert time.monotonic() < deadline, plugin.output()
            time.sleep(0.1)
        assert daemon_pid(node, claim.uid) == pid and "had died" not in plugin.output()
        assert plugin.kubelet.unprepare([claim]) == {claim.uid: ""}
    finally:
        assert plugin.stop() == 0
    assert not alive(pid) and not (node.plugin_dir / "mps" / claim.uid).exists()
    assert compute_mode(node.mig_state, gpu_2) == DEFAULT


def test_a_start_stops_a_daemon_no_record_explains(node: Node, start: Start) -> None:
    first = start(mock_driver_root=mock_root(node), mock_state=node.mig_state)
    gpu_2 = first.plugin.state.published.index["gpu-2"].gpu.uuid
    claim = make_claim(node.local, [result("gpu-2")], [opaque(ONE_GPU)])
    assert first.kubelet.prepare([claim])[claim.uid].error == ""
    pid = daemon_pid(node, claim.uid)
    first.stop()
    assert alive(pid) and compute_mode(node.mig_state, gpu_2) == EXCLUSIVE
    checkpoint.save(node.checkpoint, checkpoint.Checkpoint(
        boot_id=node.boot_id.read_text().strip()))  # its record lost
    start(mock_driver_root=mock_root(node), mock_state=node.mig_state)
    assert not alive(pid) and list((node.plugin_dir / "mps").iterdir()) == []
    assert compute_mode(node.mig_state, gpu_2) == DEFAULT


def test_a_mig_device_joins_by_its_own_uuid_and_its_gpu_keeps_its_compute_mode(
        node: Node, start: Start) -> None:
    running = start("a100-mig", mock_state=node.mig_state, mock_driver_root=mock_root(node))
    target = running.plugin.state.published.index["gpu-0-mig-3g20gb-4"]
    assert target.static_mig is not None
    config = {"apiVersion": "gpu.dra.dev/v1alpha1", "kind": "MigDeviceConfig",
              "sharing": {"strategy": "MPS", "mpsConfig": {
                  "defaultActiveThreadPercentage": 50,
                  "defaultPerDevicePinnedMemoryLimit": {target.gpu.uuid: "4Gi"}}}}
    claim = make_claim(node.local, [result("gpu-0-mig-3g20gb-4", request="mig")],
                       [opaque(config)])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    pid = daemon_pid(node, claim.uid)
    assert environment(pid)["CUDA_VISIBLE_DEVICES"] == target.static_mig.uuid
    assert control(node, claim.uid, "get_default_active_thread_percentage") == "50.0"
    assert control(node, claim.uid, "get_default_device_pinned_mem_limit 0") == "4G"
    assert compute_mode(node.mig_state, target.gpu.uuid) == DEFAULT
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert not alive(pid) and list((node.plugin_dir / "mps").iterdir()) == []
