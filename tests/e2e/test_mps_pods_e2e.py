"""MPS per claim in a cluster, end to end on the real API server: the plugin prepares a pod's
MPS claim by creating a Pod for the claim's daemon on its node (checked as stored), waits
until that daemon was told the claim's limits, keeps it across a plugin restart (adopted,
not replaced), and on unprepare tells it `quit` and deletes the Pod.

The kubelet stand-in runs no containers, so the test runs the daemon Pod's command itself,
on the host (the Pod's hostPath volumes are mounted at the host's own paths, so its
command line means the same here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.kube.api import api_request
from driver.nvml.mpsstandin import PID_FILE, SOCKET
from tests.support.apiserver import (
    RESOURCE_V1,
    ControlPlane,
    create,
    delete,
    get,
    pod_with_claim,
    wait_for,
)
from tests.support.plugin import gpu_config, opaque, short_tmp
from tests.support.standin import KubeletStandin

DRIVER = "gpu.dra.dev"
IMAGE = "registry.example.com/gpu-dra-driver:test"
MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 30,
                                            "defaultPinnedDeviceMemoryLimit": "8Gi"})


class PodRunner:
    """Plays the kubelet for the daemon pods on one node: runs each one's command, again
    when it fails."""

    def __init__(self, api: Any, namespace: str, node: str) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pods(self) -> list[dict[str, Any]]:
        return list(api_request(self.api, "GET", f"/api/v1/namespaces/{self.namespace}/pods",
                                query={"fieldSelector": f"spec.nodeName={self.node}",
                                       "labelSelector": "app.kubernetes.io/component="
                                                        "mps-daemon"}).expect(200)["items"])

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for pod in self.pods():
                known = self.processes.get(pod["metadata"]["uid"])
                if known is not None and known.poll() in (None, 0):  # restartPolicy OnFailure
                    continue
                [container] = pod["spec"]["containers"]
                assert container["command"][:2] == ["gpu-dra", "mps-daemon"]
                self.processes[pod["metadata"]["uid"]] = subprocess.Popen(
                    [sys.executable, "-m", "driver.cli", *container["command"][1:]],
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                    start_new_session=True)  # a group: what a container's end takes

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ask(claim_dir: Path, command: str) -> str:
    """The claim's daemon's answer, through the mock driver root's control client."""
    control = claim_dir.parent.parent / "mock-driver-root/usr/local/nvidia/bin/" \
        "nvidia-cuda-mps-control"
    done = subprocess.run([str(control)], input=command + "\n", capture_output=True,
                          text=True, check=True, timeout=10,
                          env={"PATH": os.environ["PATH"],
                               "CUDA_MPS_PIPE_DIRECTORY": str(claim_dir / "pipe")})
    return done.stdout.strip()


def test_a_claims_mps_daemon_runs_in_a_pod_that_outlives_the_plugin(
    control_plane: ControlPlane, fake_node: Callable[..., str], namespace: str,
    kubelet_standin: Callable[..., KubeletStandin], scheduler: Any,
    controller_manager: Any, device_classes: None,
) -> None:
    api = control_plane.api
    node = fake_node()
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(short_tmp())
        standin = kubelet_standin(node, root, "v1", DRIVER)
        folders = PluginFolders(root)
        args = [*folders.plugin_args(node=node, driver=DRIVER,
                                     kubeconfig=control_plane.kubeconfig,
                                     registry_dir=standin.registry_dir, mock="dgx-h100",
                                     mig_mode="static"),
                "--pod-namespace", namespace, "--image", IMAGE]
        plugins = [PluginDaemon(args, folders.plugin_log)]
        stack.callback(lambda: [p.stop() for p in plugins])
        runner = PodRunner(api, namespace, node)
        stack.callback(runner.stop)
        standin.wait_registered(DRIVER)

        create(api, f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims", {
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": "mps"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
                "deviceClassName": DRIVER}}], "config": [opaque(MPS, ["gpu"])]}}})
        pod = pod_with_claim("mps", {"resourceClaimName": "mps"})
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
        pod_uid = create(api, f"/api/v1/namespaces/{namespace}/pods", pod)["metadata"]["uid"]
        [claim] = standin.wait_pod(pod_uid, "prepared")["claims"]
        claim_dir = folders.plugin_dir / "mps" / claim["uid"]

        [daemon_pod] = runner.pods()
        meta, spec = daemon_pod["metadata"], daemon_pod["spec"]
        node_uid = get(api, f"/api/v1/nodes/{node}")["metadata"]["uid"]
        assert meta["labels"][f"{DRIVER}/claim-uid"] == claim["uid"]
        assert meta["annotations"][f"{DRIVER}/claim"] == f"{namespace}/mps"
        assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node",
                                            "name": node, "uid": node_uid}]
        assert spec["nodeName"] == node and spec["containers"][0]["image"] == IMAGE
        assert {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}["claim"] == \
            str(claim_dir)
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"
        assert ask(claim_dir, "get_default_device_pinned_mem_limit 0") == "8G"

        # a daemon that dies is started again by its pod, told its limits, and reported
        first = runner.processes[meta["uid"]]
        os.kill(int((claim_dir / "pipe" / PID_FILE).read_text()), signal.SIGKILL)
        assert first.wait(timeout=10) != 0  # so the pod's restart policy starts it again
        wait_for(lambda: "had died" in plugins[0].tail(),
                 "the plugin to report the daemon's restart")
        assert ask(claim_dir, "get_default_active_thread_percentage") == "30.0"

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
