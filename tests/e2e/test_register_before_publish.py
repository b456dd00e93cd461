"""With the API server the plugin registers with the kubelet before its first publish, as
upstream's kubeletplugin helper does: a claim the kubelet prepares before the slices are
on the server is prepared from its allocation, and the slices follow."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from driver.health.model import GpuHealth
from driver.inventory.model import Inventory
from driver.kube.api import api_request
from driver.nvml.mock import mock_provider
from driver.plugin.daemon import Plugin
from driver.resourceslice.plan import PublishResult
from driver.resourceslice.publish import ApiPublisher, SlicePool
from tests.support.apiserver import SLICES, ControlPlane, create, delete, unique, wait_for
from tests.support.plugin import DRIVER, Kubelet, Node, result, short_tmp
from tests.support.plugin_bench import allocated_claim

HELD = 30.0  # seconds the first publish is held at most: a start that waits for it fails


class HeldPublisher:
    """The API server's publisher, whose first publish waits until `release` is set."""

    def __init__(self, inner: ApiPublisher) -> None:
        self.inner = inner
        self.release = threading.Event()

    def publish(self, inventory: Inventory, timeout: float | None = None,
                health: Mapping[int, GpuHealth] | None = None) -> PublishResult:
        self.release.wait(HELD)
        return self.inner.publish(inventory, timeout, health)

    def cleanup(self) -> int:
        return self.inner.cleanup()


def devices(api: Any, node: str) -> set[str]:
    """The devices `node`'s pool publishes."""
    items = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)["items"]
    return {d["name"] for s in items for d in s["spec"].get("devices") or []}


def test_a_claim_prepared_before_the_first_publish_gets_its_devices(
        control_plane: ControlPlane, node_name: str, namespace: str) -> None:
    api = control_plane.api
    held = HeldPublisher(ApiPublisher(api, SlicePool(DRIVER, node_name, mig_mode="dynamic")))
    with short_tmp() as root:
        options = Node(root).options(node=node_name, local_dir=None, mig_mode="dynamic",
                                     kubeconfig=control_plane.kubeconfig,
                                     rediscover_interval=0, cleanup=True)
        plugin = Plugin(options, mock_provider("dgx-h100"), publisher=held)
        plugin.start()
        kubelet = Kubelet(options.dra_socket, options.registration_socket)
        try:
            assert kubelet.get_info(timeout=10).name == DRIVER
            assert devices(api, node_name) == set(), "registered before the first publish"
            mig = "gpu-1-mig-1g10gb-3"
            claim = allocated_claim(api, namespace, [result("gpu-0", pool=node_name),
                                                     result(mig, pool=node_name)])
            answer = kubelet.prepare([claim])[claim.uid]
            assert answer.error == ""
            assert [(d["device"], d["cdiDeviceIDs"]) for d in answer.devices] == [
                ("gpu-0", [f"k8s.{DRIVER}/claim={claim.uid}-gpu-0"]),
                (mig, [f"k8s.{DRIVER}/claim={claim.uid}-{mig}"])]
            held.release.set()
            wait_for(lambda: {"gpu-0", mig} <= devices(api, node_name) or None,
                     f"{node_name}'s ResourceSlices")
            assert kubelet.unprepare([claim]) == {claim.uid: ""}
        finally:
            held.release.set()
            kubelet.close()
            plugin.stop(grace=1)


@contextmanager
def may_not_publish(control_plane: ControlPlane, namespace: str,
                    folder: Path) -> Iterator[Path]:
    """A kubeconfig of a ServiceAccount that may read Nodes, ResourceSlices and claims but
    not create ResourceSlices; its ClusterRole and binding are deleted at the end."""
    api, name = control_plane.api, unique("reader")
    create(api, f"/api/v1/namespaces/{namespace}/serviceaccounts",
           {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    rules = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
             {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"],
              "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"],
              "verbs": ["get"]}]
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    create(api, f"{rbac}/clusterroles", {"apiVersion": "rbac.authorization.k8s.io/v1",
                                         "kind": "ClusterRole", "metadata": {"name": name},
                                         "rules": rules})
    create(api, f"{rbac}/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
    token = create(api, f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600}})["status"]["token"]
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        **admin, "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": admin["clusters"][0]["name"],
                                                "user": name}}],
        "current-context": name}))
    try:
        yield path
    finally:
        delete(api, f"{rbac}/clusterrolebindings/{name}")
        delete(api, f"{rbac}/clusterroles/{name}")


def test_a_publish_the_api_server_refuses_stops_the_plugin_with_exit_code_2(
        control_plane: ControlPlane, node_name: str, namespace: str) -> None:
    with short_tmp() as root, may_not_publish(control_plane, namespace, root) as kubeconfig:
        args = Node(root).cli_args("dgx-h100", node_name=node_name, kubeconfig=kubeconfig)
        ran = subprocess.run([sys.executable, "-m", "driver.cli", *args], timeout=120,
                             capture_output=True, text=True, check=False)
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert "gpu-dra plugin: cannot publish ResourceSlices: POST ResourceSlice " \
           f"{node_name}-{DRIVER}-0: HTTP 403" in ran.stderr
    assert devices(control_plane.api, node_name) == set()
