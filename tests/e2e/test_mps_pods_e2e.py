"""MPS per claim in a cluster, end to end on the real API server: the plugin prepares a pod's
MPS claim by creating a Pod for the claim's daemon on its node (checked as stored), waits
until that daemon was told the claim's limits, keeps it across a plugin restart (adopted,
not replaced), and on unprepare tells it `quit` and deletes the Pod.

The kubelet stand-in runs no containers, so the test runs the daemon Pod's command itself,
on the host (the Pod's hostPath volumes are mounted at the host's own paths, so its
command line means the same here)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from driver.devcluster.node import PluginDaemon
from driver.nvml.mpsstandin import SOCKET
from tests.support.apiserver import (
    RESOURCE_V1,
    ControlPlane,
    create,
    delete,
    get,
    pod_with_claim,
    wait_for,
)
from tests.support.mpspods import IMAGE, ask, mps_node
from tests.support.plugin import gpu_config, opaque
from tests.support.standin import KubeletStandin

DRIVER = "gpu.dra.dev"
MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 30,
                                            "defaultPinnedDeviceMemoryLimit": "8Gi"})


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
