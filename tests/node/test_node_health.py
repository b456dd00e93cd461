"""A GPU that fails under a running pod, as its owner sees it on a real node: the chart's
plugin (mock dgx-h100, its mock state in the plugin data dir on the node) reports health
over NodeWatchResources; `gpu-dra mock inject --xid 79` on the pod's GPU makes the real
kubelet (ResourceHealthStatus, beta and on in 1.37) show the device Unhealthy, with the
cause, in the pod's `status.containerStatuses[].allocatedResourcesStatus`; `--recover`
makes it Healthy again. The pod keeps running throughout (no eviction by default).

The inject-to-Unhealthy time in the pod's status is printed (run with ``-s``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.apiserver import wait_for
from tests.support.nodepods import DRIVER, Workloads
from tests.support.realnode import RealNode

REPO = Path(__file__).resolve().parents[2]
MOCK_STATE = f"/var/lib/kubelet/plugins/{DRIVER}/mock-state.json"  # conftest's chart values


def inject(node: RealNode, minor: int, *fault: str) -> None:
    """`gpu-dra mock inject` on the node's mock state, as an admin or a check would."""
    done = subprocess.run([sys.executable, "-m", "driver.cli", "mock", "inject",
                           "--mock-state", str(node.host_path(MOCK_STATE)),
                           "--gpu", str(minor), *fault],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def device_health(workloads: Workloads, pod: str) -> list[dict[str, Any]]:
    """The health the kubelet reports for the devices of the pod's container `main`."""
    found = (workloads.get_pod(pod) or {}).get("status", {}).get("containerStatuses") or []
    return [resource for status in found if status["name"] == "main"
            for claim in status.get("allocatedResourcesStatus") or []
            for resource in claim["resources"]]


def test_the_pods_status_shows_its_gpu_unhealthy_after_xid_79_then_healthy(
        workloads: Workloads, real_node: RealNode) -> None:
    workloads.claim("sick")
    workloads.pod("sick", ["sick"], command="exec sleep 3600")
    workloads.wait_running("sick")
    (device,) = workloads.allocated("sick")
    minor = int(device.removeprefix("gpu-"))

    def health() -> set[str]:
        return {r["health"] for r in device_health(workloads, "sick")}

    wait_for(lambda: health() == {"Healthy"}, "the pod's GPU reported Healthy", timeout=60)
    (resource,) = device_health(workloads, "sick")
    assert workloads.claim_uid("sick") in resource["resourceID"], resource
    begin = time.monotonic()
    inject(real_node, minor, "--xid", "79")
    try:
        wait_for(lambda: health() == {"Unhealthy"}, "the pod's GPU reported Unhealthy",
                 timeout=60, interval=0.05)
        unhealthy_s = time.monotonic() - begin
        (resource,) = device_health(workloads, "sick")
        message = resource.get("message", "")
        assert "79" in message and "fallen off the bus" in message, resource
        assert workloads.phase("sick") == "Running"
        print(f"\ninject --xid 79 to Unhealthy in the pod's allocatedResourcesStatus: "
              f"{unhealthy_s:.2f}s")
    finally:
        inject(real_node, minor, "--recover")
    wait_for(lambda: health() == {"Healthy"}, "the pod's GPU reported Healthy again",
             timeout=60)
    assert workloads.phase("sick") == "Running"
