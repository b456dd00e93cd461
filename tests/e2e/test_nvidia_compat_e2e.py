"""The NVIDIA-compatible install (`driverName: gpu.nvidia.com`) on the real control plane:
the chart's DeviceClasses are stored as NVIDIA's (`gpu.nvidia.com` with
`extendedResourceName: nvidia.com/gpu`, `mig.nvidia.com`), and a pod written for the
device plugin, `resources.limits: {nvidia.com/gpu: 1}`, is scheduled by the real
kube-scheduler with a claim it makes (KEP-5004, GA and locked on in 1.37) and prepared by
our plugin through the kubelet's own DRA code (kubelet-standin). The helm values and the
pod are those of README.md's migration guide."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from driver.devcluster.controlplane import LocalCluster
from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.kube.api import api_request
from driver.plugin import cdi
from tests.support.apiserver import (
    DEVICE_CLASSES,
    RESOURCE_V1,
    SLICES,
    ControlPlane,
    create,
    delete,
    get,
    wait_for,
)
from tests.support.chart import Helm, only
from tests.support.plugin import short_tmp
from tests.support.readme import commands, helm_values, section, yaml_objects
from tests.support.standin import KubeletStandin

DRIVER = "gpu.nvidia.com"
GUIDE = section("### Migrating")


@pytest.fixture
def nvidia_classes(helm: Helm, control_plane: ControlPlane) -> Iterator[dict[str, Any]]:
    """The compatible install's DeviceClasses, as the chart renders them, stored by the API
    server (by name); deleted after the test."""
    (install,) = [c for c in commands(GUIDE) if c[:2] == ["helm", "install"]]
    classes = only(helm.template("gpu", "gpu-dra", helm_values(install)), "DeviceClass")
    stored = {c["metadata"]["name"]: create(control_plane.api, DEVICE_CLASSES, c)
              for c in classes}
    yield stored
    for name in stored:
        api_request(control_plane.api, "DELETE", f"{DEVICE_CLASSES}/{name}").expect(200, 404)


def test_a_device_plugin_pod_gets_a_gpu_from_this_driver(
    control_plane: ControlPlane, scheduler: LocalCluster, controller_manager: LocalCluster,
    nvidia_classes: dict[str, Any], fake_node: Callable[..., str],
    kubelet_standin: Callable[..., KubeletStandin], namespace: str,
) -> None:
    assert {name: c["spec"].get("extendedResourceName")
            for name, c in nvidia_classes.items()} == {
        "gpu.nvidia.com": "nvidia.com/gpu", "mig.nvidia.com": "gpu.nvidia.com/mig"}
    api = control_plane.api
    with short_tmp() as root:
        node = fake_node()
        standin = kubelet_standin(node, root, "v1", DRIVER)
        folders = PluginFolders(root)
        plugin = PluginDaemon(folders.plugin_args(
            node=node, driver=DRIVER, kubeconfig=control_plane.kubeconfig,
            registry_dir=standin.registry_dir, mock="dgx-h100", mig_mode="static"),
            folders.plugin_log)
        try:
            standin.wait_registered(DRIVER)
            wait_for(lambda: api_request(api, "GET", SLICES, query={
                "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)[
                "items"], f"{node}'s ResourceSlices")
            pods = f"/api/v1/namespaces/{namespace}/pods"
            (pod,) = yaml_objects(GUIDE)
            pod["spec"] |= {"terminationGracePeriodSeconds": 0,
                            "nodeSelector": {"kubernetes.io/hostname": node}}
            uid = create(api, pods, pod)["metadata"]["uid"]
            status = standin.wait_pod(uid, "prepared")
            scheduled = get(api, f"{pods}/cuda")
            assert scheduled is not None and scheduled["spec"]["nodeName"] == node
            made = scheduled["status"]["extendedResourceClaimStatus"]["resourceClaimName"]
            claim = get(api, f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims/{made}")
            assert claim is not None
            [result] = claim["status"]["allocation"]["devices"]["results"]
            assert (result["driver"], result["pool"]) == (DRIVER, node)
            assert result["device"].startswith("gpu-")
            assert status["containers"]["cuda"] == [cdi.qualified_name(
                DRIVER, cdi.device_name(claim["metadata"]["uid"], result["device"]))]
            delete(api, f"{pods}/cuda")
            standin.wait_pod(uid, "unprepared")
            assert not (folders.cdi_root /
                        cdi.spec_file_name(DRIVER, claim["metadata"]["uid"])).exists()
        finally:
            print(f"--- gpu-dra plugin (exit {plugin.stop()}) ---\n{plugin.tail()}")
            print(f"--- kubelet-standin ---\n{standin.tail()}")
            api_request(api, "DELETE", SLICES,
                        query={"fieldSelector": f"spec.nodeName={node}"}).expect(200, 404)
