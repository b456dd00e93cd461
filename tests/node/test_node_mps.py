"""MPS per claim on a real node: the chart's plugin runs the claim's daemon in a Pod of its
own (the driver's image, the mock driver root's stand-in daemon told the claim's limits);
the claim's container (busybox) sees CUDA_MPS_PIPE_DIRECTORY and the daemon's socket; the
Pod outlives the plugin's pod (deleted: the DaemonSet makes a new one, which adopts it);
deleting the workload unprepares the claim and the daemon's Pod goes away. A daemon that
hangs fails the Pod's liveness probe: the real kubelet kills its container and starts it
again, told its limits, and the plugin reports the restart."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from driver.kube.api import api_request
from driver.nvml.mpsstandin import LOG_FILE, PID_FILE, SOCKET
from tests.support.apiserver import wait_for
from tests.support.nodepods import CHART_NAMESPACE, DRIVER, Driver, Workloads
from tests.support.plugin import gpu_config
from tests.support.realnode import RealNode

MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 30,
                                            "defaultPinnedDeviceMemoryLimit": "8Gi"})
SHOW = "echo pipe=$CUDA_MPS_PIPE_DIRECTORY; ls /tmp/nvidia-mps; echo == end; exec sleep 3600"


def daemon_pods(node: RealNode) -> list[dict[str, Any]]:
    pods = api_request(node.api, "GET", f"/api/v1/namespaces/{CHART_NAMESPACE}/pods",
                       query={"labelSelector": "app.kubernetes.io/component=mps-daemon"})
    return [p for p in pods.expect(200)["items"] if not p["metadata"].get("deletionTimestamp")]


def running(pod: dict[str, Any]) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return bool(statuses) and all("running" in s.get("state", {}) for s in statuses)


def test_an_mps_claims_daemon_runs_in_its_own_pod_and_outlives_the_plugin(
        workloads: Workloads, driver: Driver, real_node: RealNode) -> None:
    workloads.claim("mps", config=MPS)
    workloads.pod("mps", ["mps"], command=SHOW)
    workloads.wait_running("mps")
    uid = workloads.claim_uid("mps")
    log = workloads.log("mps")
    assert "pipe=/tmp/nvidia-mps" in log and SOCKET in log.split(), log

    [daemon] = daemon_pods(real_node)
    assert daemon["metadata"]["labels"][f"{DRIVER}/claim-uid"] == uid
    assert running(daemon), daemon.get("status")
    claim_dir = real_node.host_path(f"/var/lib/kubelet/plugins/{DRIVER}/mps/{uid}")
    told = (claim_dir / "log" / LOG_FILE).read_text()
    assert "Cmd:set_default_active_thread_percentage 30" in told
    assert "Cmd:set_default_device_pinned_mem_limit 0 8G" in told
    starts = told.count("Starting control daemon")

    old = driver.wait_ready()["metadata"]["uid"]
    api_request(real_node.api, "DELETE", f"/api/v1/namespaces/{CHART_NAMESPACE}/pods/"
                f"{driver.wait_ready()['metadata']['name']}").expect(200)
    wait_for(lambda: (p := driver.ready_pod()) is not None and p["metadata"]["uid"] != old,
             "a new plugin pod Ready", timeout=180)
    wait_for(lambda: "is running" in driver.plugin_log(), "the new plugin to adopt the daemon",
             timeout=60)
    [after] = daemon_pods(real_node)
    assert after["metadata"]["uid"] == daemon["metadata"]["uid"] and running(after)
    assert (claim_dir / "log" / LOG_FILE).read_text().count("Starting control daemon") == \
        starts

    workloads.delete_pod("mps")
    wait_for(lambda: daemon_pods(real_node) == [], "the daemon's pod gone", timeout=60)
    wait_for(lambda: not Path(claim_dir).exists(), "the claim's MPS directory gone",
             timeout=30)


def test_a_hung_daemon_fails_its_liveness_probe_and_the_kubelet_starts_it_again(
        workloads: Workloads, driver: Driver, real_node: RealNode) -> None:
    workloads.claim("mps", config=MPS)
    workloads.pod("mps", ["mps"], command=SHOW)
    workloads.wait_running("mps")
    uid = workloads.claim_uid("mps")
    claim_dir = real_node.host_path(f"/var/lib/kubelet/plugins/{DRIVER}/mps/{uid}")
    [daemon] = daemon_pods(real_node)
    assert running(daemon), daemon.get("status")
    hung = int((claim_dir / "pipe" / PID_FILE).read_text())  # hostPID: the host's pid
    os.kill(hung, signal.SIGSTOP)  # alive, but its pipe answers nothing

    def started_again() -> dict[str, Any] | None:
        [pod] = daemon_pods(real_node)
        [status] = pod["status"].get("containerStatuses") or [{}]
        return status if status.get("restartCount", 0) >= 1 and running(pod) else None

    status = wait_for(started_again, "the kubelet to start the hung daemon's container "
                      "again", timeout=180)
    assert status["lastState"]["terminated"]["exitCode"] != 0
    events = api_request(real_node.api, "GET", f"/api/v1/namespaces/{CHART_NAMESPACE}/events",
                         query={"fieldSelector": "involvedObject.name="
                                                 f"{daemon['metadata']['name']}"}).expect(200)
    assert any(e["reason"] == "Unhealthy" and "Liveness probe failed" in e["message"]
               for e in events["items"]), [e["message"] for e in events["items"]]
    assert not Path(f"/proc/{hung}").exists()
    wait_for(lambda: "had died" in driver.plugin_log(), "the plugin to report the restart",
             timeout=60)
    told = (claim_dir / "log" / LOG_FILE).read_text()
    assert told.count("Cmd:set_default_active_thread_percentage 30") == 2

    workloads.delete_pod("mps")
    wait_for(lambda: daemon_pods(real_node) == [], "the daemon's pod gone", timeout=60)
