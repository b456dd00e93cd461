"""MPS per claim in a cluster, end to end on the real API server: the plugin prepares a pod's
MPS claim by creating a Pod for the claim's daemon on its node (checked as stored, with its
liveness probe), waits until that daemon was told the claim's limits, keeps it across a
plugin restart (adopted, not replaced), reports a daemon its Pod's kubelet starts again
(log, metric; the kubelet's health cache while it is down): one that died, one a workload
told `quit`, one that hung (its liveness probe fails); puts a GPU reset to Default back in
EXCLUSIVE_PROCESS; and on unprepare tells it `quit` and deletes the Pod.

The kubelet stand-in runs no containers, so the test runs the daemon Pod's command and
liveness probe itself, on the host (the Pod's hostPath volumes are mounted at the host's
own paths, so its command line means the same here), and writes the Pod's phase."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml

from driver.devcluster.node import PluginDaemon
from driver.kube.api import api_request
from driver.nvml.mock import compute_mode
from driver.nvml.mpsstandin import PID_FILE, SOCKET
from driver.plugin.mps import ClaimMps
from driver.plugin.mpspod import READY
from tests.support.apiserver import (
    RESOURCE_V1,
    ControlPlane,
    create,
    delete,
    get,
    pod_with_claim,
    wait_for,
)
from tests.support.metrics import scrape
from tests.support.mpspods import IMAGE, MpsNode, ask, mps_node
from tests.support.plugin import gpu_config, opaque
from tests.support.standin import KubeletStandin
from tests.unit.test_mock_nvml import started

DRIVER = "gpu.dra.dev"
MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 30,
                                            "defaultPinnedDeviceMemoryLimit": "8Gi"})
RESTARTS = "gpu_dra_mps_daemon_restarts_total"
EXCLUSIVE, DEFAULT = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS, pynvml.NVML_COMPUTEMODE_DEFAULT


def daemon_pid(claim_dir: Path) -> int | None:
    """The claim's control daemon's pid once it was told its limits (`ready`)."""
    with contextlib.suppress(OSError, ValueError):
        if (claim_dir / READY).exists():
            return int((claim_dir / "pipe" / PID_FILE).read_text())
    return None


def kill_daemon(claim_dir: Path) -> int:
    """SIGKILL the claim's control daemon; its pid."""
    pid = daemon_pid(claim_dir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


def reports(mps: MpsNode) -> int:
    """How many times the plugins of this test logged a daemon's restart."""
    return mps.folders.plugin_log.read_text().count("had died")


def prepared_pod(mps: MpsNode, api: Any, namespace: str, node: str
                 ) -> tuple[str, dict[str, Any]]:
    """A pod on `node` with an MPS claim `mps` of one GPU (30 %, 8Gi), once the kubelet
    stand-in has it prepared: its uid, and its claim as the stand-in reports it."""
    create(api, f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims", {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "mps"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": DRIVER}}], "config": [opaque(MPS, ["gpu"])]}}})
    pod = pod_with_claim("mps", {"resourceClaimName": "mps"})
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    pod_uid = create(api, f"/api/v1/namespaces/{namespace}/pods", pod)["metadata"]["uid"]
    [claim] = mps.standin.wait_pod(pod_uid, "prepared")["claims"]
    return pod_uid, claim


def test_a_claims_mps_daemon_runs_in_a_pod_that_outlives_the_plugin(
    control_plane: ControlPlane, fake_node: Callable[..., str], namespace: str,
    kubelet_standin: Callable[..., KubeletStandin], scheduler: Any,
    controller_manager: Any, device_classes: None,
) -> None:
    api = control_plane.api
    node = fake_node()
    with contextlib.ExitStack() as stack:
        mps = mps_node(stack, control_plane, node, namespace, kubelet_standin)
        standin, folders, args, plugins, runner = (mps.standin, mps.folders, mps.args,
                                                   mps.plugins, mps.runner)

        pod_uid, claim = prepared_pod(mps, api, namespace, node)
        claim_dir = folders.plugin_dir / "mps" / claim["uid"]

        [daemon_pod] = runner.pods()
        meta, spec = daemon_pod["metadata"], daemon_pod["spec"]
        node_uid = get(api, f"/api/v1/nodes/{node}")["metadata"]["uid"]
        assert meta["labels"][f"{DRIVER}/claim-uid"] == claim["uid"]
        assert meta["annotations"][f"{DRIVER}/claim"] == f"{namespace}/mps"
        assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node",
                                            "name": node, "uid": node_uid}]
        assert spec["nodeName"] == node and spec["containers"][0]["image"] == IMAGE
        driver_root = str(folders.plugin_dir / "mock-driver-root")
        assert spec["containers"][0]["livenessProbe"] == {
            "exec": {"command": ["gpu-dra", "mps-daemon", "--probe", "--claim-dir",
                                 str(claim_dir), "--driver-root", driver_root]},
            "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 10,
            "failureThreshold": 3, "successThreshold": 1}  # the API server's default
        assert {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}["claim"] == \
            str(claim_dir)
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"
        assert ask(claim_dir, "get_default_device_pinned_mem_limit 0") == "8G"

        # a daemon that dies at once is started again by its pod, told its limits, and
        # reported, though the plugin had not looked at it yet
        first = runner.processes[meta["uid"]]
        kill_daemon(claim_dir)
        assert first.wait(timeout=10) != 0  # so the pod's restart policy starts it again
        wait_for(lambda: reports(mps) == 1, "the plugin to report the daemon's restart")
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"
        assert scrape(mps.metrics_port)[RESTARTS] == 1

        # a plugin restart adopts the pod: the same pod, the same daemon process
        plugins[0].stop()
        plugins.append(PluginDaemon(args, folders.plugin_log))
        wait_for(lambda: "is running" in plugins[-1].tail(), "the new plugin to adopt it")
        assert [p["metadata"]["uid"] for p in runner.pods()] == [meta["uid"]]
        assert runner.processes[meta["uid"]].poll() is None

        delete(api, f"/api/v1/namespaces/{namespace}/pods/mps")
        standin.wait_pod(pod_uid, "unprepared")
        assert runner.pods() == []
        assert runner.processes[meta["uid"]].wait(timeout=10) == 0  # told `quit`
        assert not claim_dir.exists() and not (claim_dir / "pipe" / SOCKET).exists()


def test_a_daemon_its_pod_starts_again_is_down_on_the_health_stream_then_reported(
    control_plane: ControlPlane, fake_node: Callable[..., str], namespace: str,
    kubelet_standin: Callable[..., KubeletStandin], scheduler: Any,
    controller_manager: Any, device_classes: None,
) -> None:
    """While the kubelet backs off the daemon's container, the claim's GPU is Unhealthy in
    the kubelet's health cache, naming the claim; once the container runs again the
    restart is logged and counted, and so is one that happened while the plugin was
    stopped (the next plugin reports it)."""
    api = control_plane.api
    node = fake_node()
    with contextlib.ExitStack() as stack:
        mps = mps_node(stack, control_plane, node, namespace, kubelet_standin)
        pod_uid, claim = prepared_pod(mps, api, namespace, node)
        claim_dir = mps.folders.plugin_dir / "mps" / claim["uid"]
        [result] = get(api, f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims/mps"
                       )["status"]["allocation"]["devices"]["results"]

        def health() -> tuple[str, str]:
            seen = mps.standin.device_health(DRIVER).get((node, result["device"]), {})
            return seen.get("health", ""), seen.get("message", "")

        wait_for(lambda: health() == ("Healthy", ""), "the kubelet to see the GPU healthy")
        [daemon_pod] = mps.runner.pods()
        with mps.runner.backing_off():
            kill_daemon(claim_dir)
            assert mps.runner.processes[daemon_pod["metadata"]["uid"]].wait(timeout=10) != 0
            wait_for(lambda: health()[0] == "Unhealthy", "the kubelet to see the GPU "
                     "unhealthy while the daemon's container is down", timeout=20)
        assert health()[1] == (
            f"MPS daemon of claim {namespace}/mps ({claim['uid']}) is down: MPS of claim "
            f"{claim['uid']}: its daemon does not answer, and its pod {namespace}/"
            f"mps-{claim['uid']} (Running) has not started it again yet; starting it again")
        wait_for(lambda: health() == ("Healthy", ""), "the GPU healthy once it answers")
        assert reports(mps) == 1 and scrape(mps.metrics_port)[RESTARTS] == 1
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"

        # a restart while no plugin runs is reported by the next one
        mps.plugins[-1].stop()
        killed = kill_daemon(claim_dir)
        wait_for(lambda: daemon_pid(claim_dir) not in (None, killed),
                 "the pod's kubelet to start the daemon again")
        mps.plugins.append(PluginDaemon(mps.args, mps.folders.plugin_log))
        wait_for(lambda: reports(mps) == 2, "the new plugin to report the restart")
        assert scrape(mps.metrics_port)[RESTARTS] == 1  # the new plugin's count
        wait_for(lambda: health() == ("Healthy", ""), "the new plugin's GPU healthy")

        delete(api, f"/api/v1/namespaces/{namespace}/pods/mps")
        mps.standin.wait_pod(pod_uid, "unprepared")
        assert mps.runner.pods() == [] and not claim_dir.exists()


def test_a_workloads_quit_a_hung_daemon_and_a_gpu_reset_are_undone(
    control_plane: ControlPlane, fake_node: Callable[..., str], namespace: str,
    kubelet_standin: Callable[..., KubeletStandin], scheduler: Any,
    controller_manager: Any, device_classes: None,
) -> None:
    """A workload's `quit` through the pipe: the Pod's container fails (it was not the
    plugin's), so its kubelet starts it again in the same Pod (not Succeeded) and the
    plugin reports the restart. A GPU reset (the mock's compute mode set to Default
    behind the plugin's back): EXCLUSIVE_PROCESS again, no restart. A daemon that hangs:
    its liveness probe fails, the kubelet kills and starts it again, the plugin reports it.
    A Pod that ended (evicted: Failed) is replaced by the plugin, reported too. Unprepare:
    the container exits 0, the GPU's mode is Default again."""
    api = control_plane.api
    node = fake_node()
    with contextlib.ExitStack() as stack:
        mps = mps_node(stack, control_plane, node, namespace, kubelet_standin,
                       mock_state=True)
        pod_uid, claim = prepared_pod(mps, api, namespace, node)
        claim_dir = mps.folders.plugin_dir / "mps" / claim["uid"]
        [gpu] = [d.gpu_uuid for d in ClaimMps.load(claim_dir).devices]
        [daemon_pod] = mps.runner.pods()
        assert compute_mode(mps.folders.mig_state, gpu) == EXCLUSIVE

        first = mps.runner.processes[daemon_pod["metadata"]["uid"]]
        ask(claim_dir, "quit")
        assert first.wait(timeout=10) == 1
        wait_for(lambda: reports(mps) == 1, "the plugin to report the daemon's restart")
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"
        [now] = mps.runner.pods()  # the same Pod, not Succeeded
        assert (now["metadata"]["uid"], now["status"]["phase"]) == (
            daemon_pod["metadata"]["uid"], "Running")

        nvml = started("dgx-h100", mps.folders.mig_state)
        nvml.nvmlDeviceSetComputeMode(nvml.nvmlDeviceGetHandleByUUID(gpu), DEFAULT)
        wait_for(lambda: compute_mode(mps.folders.mig_state, gpu) == EXCLUSIVE,
                 "the plugin to put its GPU back in EXCLUSIVE_PROCESS")
        assert reports(mps) == 1

        hung = daemon_pid(claim_dir)
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)  # alive, but its pipe answers nothing
        wait_for(lambda: daemon_pid(claim_dir) not in (None, hung),
                 "the liveness probe to have the daemon started again", timeout=120)
        wait_for(lambda: reports(mps) == 2, "the plugin to report the restart")
        assert not Path(f"/proc/{hung}").exists() or \
            Path(f"/proc/{hung}/stat").read_text().split(") ")[1][0] == "Z"
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"
        assert [p["metadata"]["uid"] for p in mps.runner.pods()] == \
            [daemon_pod["metadata"]["uid"]]

        with mps.runner.backing_off():  # evicted: its kubelet ends it, Failed
            kill_daemon(claim_dir)
            api_request(api, "PATCH", f"/api/v1/namespaces/{namespace}/pods/"
                        f"{daemon_pod['metadata']['name']}/status",
                        {"status": {"phase": "Failed"}},
                        content_type="application/merge-patch+json").expect(200)
        wait_for(lambda: reports(mps) == 3, "the plugin to replace the Pod and report it")
        [replaced] = mps.runner.pods()
        assert replaced["metadata"]["uid"] != daemon_pod["metadata"]["uid"]
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"

        delete(api, f"/api/v1/namespaces/{namespace}/pods/mps")
        mps.standin.wait_pod(pod_uid, "unprepared")
        assert mps.runner.processes[replaced["metadata"]["uid"]].wait(timeout=10) == 0
        assert mps.runner.pods() == [] and not claim_dir.exists()
        assert compute_mode(mps.folders.mig_state, gpu) == DEFAULT
