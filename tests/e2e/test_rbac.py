"""The chart's ServiceAccount, ClusterRole and ValidatingAdmissionPolicy on the real API
server: the driver publishes its own node's ResourceSlices and reads claims, and is
refused another node's (or another driver's) slices and every other write.

The driver acts with a real token of the chart's ServiceAccount, minted through the
TokenRequest API and bound to a Pod made from the chart's DaemonSet template on a fake
node, exactly as the kubelet mints the pod's projected token: it carries the node
(user extra ``authentication.kubernetes.io/node-name``) that the policy checks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.inventory.discovery import discover
from driver.kube.api import ApiError, ApiResult, api_request
from driver.kube.events import post_node_event
from driver.nvml.mock import mock_provider
from driver.plugin.claims import ClaimRef
from driver.plugin.claimstatus import FINAL, api_writer, apply_body
from driver.plugin.mps import ClaimMps, Limits
from driver.plugin.mpspod import PodSettings, pod_spec
from driver.resourceslice.publish import ApiPublisher, SlicePool
from tests.support.apiserver import (
    SLICES,
    ControlPlane,
    create,
    delete,
    get,
    resource_slice,
    unique,
    wait_for,
)
from tests.support.chart import Helm, created, one

NODE_CLAIM = "authentication.kubernetes.io/node-name"
CLAIMS = "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims"


@dataclass(frozen=True)
class Install:
    driver: str
    namespace: str
    service_account: str
    objects: list[dict[str, Any]]


@pytest.fixture
def install(helm: Helm, control_plane: ControlPlane, namespace: str) -> Iterator[Install]:
    """The chart's objects, with a driver name no other test uses (its policy and role
    are cluster-wide), created on the API server and deleted after the test."""
    driver = f"{unique('gpu')}.example.com"
    objects = helm.template(unique("rel"), namespace, {"driverName": driver})
    with created(control_plane.api, objects) as stored:
        sa = one(stored, "ServiceAccount")["metadata"]["name"]
        yield Install(driver, namespace, sa, stored)


def token_for(api: Any, install: Install, bound_pod: dict[str, Any] | None) -> str:
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if bound_pod is not None:
        meta = bound_pod["metadata"]
        spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                  "uid": meta["uid"]}
    review = create(api, f"/api/v1/namespaces/{install.namespace}/serviceaccounts/"
                         f"{install.service_account}/token",
                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                     "spec": spec})
    return str(review["status"]["token"])


def client_with_token(control_plane: ControlPlane, token: str, folder: Path) -> Any:
    """An API client of the session cluster that authenticates with ``token`` only."""
    from kubernetes import config as kube_config

    path = kubeconfig_with_token(control_plane, token, folder)
    return kube_config.new_client_from_config(config_file=str(path))


def kubeconfig_with_token(control_plane: ControlPlane, token: str, folder: Path) -> Path:
    """A kubeconfig file of the session cluster that authenticates with ``token`` only."""
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    config = {**admin, "users": [{"name": "driver", "user": {"token": token}}],
              "contexts": [{"name": "driver", "context": {
                  "cluster": admin["clusters"][0]["name"], "user": "driver"}}],
              "current-context": "driver"}
    path = folder / f"kubeconfig-{unique('token')}"
    path.write_text(yaml.safe_dump(config))
    return path


def plugin_pod(control_plane: ControlPlane, install: Install, node: str) -> dict[str, Any]:
    """The Pod the DaemonSet controller would make on ``node`` (no such controller runs
    here); admitted by the API server, never started (there is no kubelet)."""
    template = one(install.objects, "DaemonSet")["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": unique("plugin"), "labels": template["metadata"]["labels"]},
           "spec": {**template["spec"], "nodeName": node}}
    return create(control_plane.api, f"/api/v1/namespaces/{install.namespace}/pods", pod)


def message(result: ApiResult) -> str:
    return str(result.body.get("message", "")) if isinstance(result.body, dict) else ""


def refused(result: ApiResult) -> str:
    assert result.status == 403, f"{result.method} {result.path}: expected 403, got " \
                                 f"{result.status}: {message(result)}"
    return message(result)


@pytest.fixture
def driver_on_node(
    control_plane: ControlPlane, install: Install, fake_node: Callable[..., str],
    tmp_path: Path,
) -> Iterator[tuple[Any, str]]:
    """(API client of the driver pod on a GPU node, that node)."""
    node = fake_node(labels={"nvidia.com/gpu.present": "true"})
    pod = plugin_pod(control_plane, install, node)
    api = client_with_token(control_plane, token_for(control_plane.api, install, pod), tmp_path)
    other = unique("other-node")
    probe = resource_slice(unique("probe"), install.driver, other, [{"name": "gpu-0"}])

    def policy_in_force() -> bool:
        # The authorizer and the policy are informer-fed: wait until both see the chart.
        result = api_request(api, "POST", SLICES, probe, query={"dryRun": "All"})
        if result.status == 403 and "its own node" in message(result):
            return True
        raise AssertionError(f"HTTP {result.status}: {message(result)}")

    wait_for(policy_in_force, "the chart's RBAC and ValidatingAdmissionPolicy in force")
    yield api, node
    api.close()
    delete(control_plane.api, f"/api/v1/namespaces/{install.namespace}/pods/"
                              f"{pod['metadata']['name']}", grace_seconds=0)


def test_the_pod_token_carries_its_node(driver_on_node: tuple[Any, str],
                                        install: Install) -> None:
    api, node = driver_on_node
    review = create(api, "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    user = review["status"]["userInfo"]
    assert user["username"] == \
        f"system:serviceaccount:{install.namespace}:{install.service_account}"
    assert user["extra"][NODE_CLAIM] == [node]


def test_driver_publishes_its_own_nodes_slices(
    control_plane: ControlPlane, driver_on_node: tuple[Any, str], install: Install
) -> None:
    api, node = driver_on_node
    selector = f"spec.nodeName={node},spec.driver={install.driver}"
    publisher = ApiPublisher(api, SlicePool(install.driver, node, "dynamic"))
    first = publisher.publish(discover(mock_provider("a100-mig")), timeout=30)
    assert len(first.created) == 2
    # A machine with no MIG: one slice is updated, the other deleted.
    second = publisher.publish(discover(mock_provider("l4-8x")), timeout=30)
    assert second.updated and second.deleted
    stored = api_request(control_plane.api, "GET", SLICES,
                         query={"fieldSelector": selector}).expect(200)["items"]
    assert {s["metadata"]["name"] for s in stored} == set(second.created + second.updated)
    assert {o["name"] for s in stored for o in s["metadata"]["ownerReferences"]} == {node}
    watched = api_request(api, "GET", SLICES, query={
        "fieldSelector": selector, "watch": "true", "timeoutSeconds": "1"})
    assert watched.status == 200, message(watched)
    assert publisher.cleanup() == len(stored)
    assert api_request(control_plane.api, "GET", SLICES,
                       query={"fieldSelector": selector}).expect(200)["items"] == []


def test_driver_reads_claims(control_plane: ControlPlane, driver_on_node: tuple[Any, str],
                             install: Install) -> None:
    api, _ = driver_on_node
    claims = CLAIMS.format(ns=install.namespace)
    claim = create(control_plane.api, claims, {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "gpu"},
        "spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": install.driver}}]}}})
    read = api_request(api, "GET", f"{claims}/gpu").expect(200)
    assert read["metadata"]["uid"] == claim["metadata"]["uid"]
    refused(api_request(api, "PUT", f"{claims}/gpu/status", read))
    refused(api_request(api, "DELETE", f"{claims}/gpu"))
    refused(api_request(api, "POST", claims, {**claim, "metadata": {"name": "mine"}}))


def test_driver_posts_events_on_its_node(control_plane: ControlPlane,
                                        driver_on_node: tuple[Any, str]) -> None:
    """What `kubectl describe node` shows when the plugin finds no nvidia-cdi-hook."""
    api, node = driver_on_node
    post_node_event(api, node, "NvidiaCDIHookMissing", "no nvidia-cdi-hook", "gpu.dra.dev")
    selector = f"involvedObject.kind=Node,involvedObject.name={node},reason=NvidiaCDIHookMissing"
    events = api_request(control_plane.api, "GET", "/api/v1/events",
                         query={"fieldSelector": selector}).expect(200)["items"]
    assert [(e["type"], e["message"], e["involvedObject"]["uid"]) for e in events] == \
        [("Warning", "no nvidia-cdi-hook", node)]


def test_driver_is_refused_other_nodes_slices(
    control_plane: ControlPlane, driver_on_node: tuple[Any, str], install: Install
) -> None:
    api, node = driver_on_node
    other = unique("other-node")
    theirs = create(control_plane.api, SLICES, resource_slice(
        unique("theirs"), install.driver, other, [{"name": "gpu-0"}]))
    path = f"{SLICES}/{theirs['metadata']['name']}"
    try:
        new = resource_slice(unique("mine"), install.driver, other, [{"name": "gpu-0"}])
        assert f"not one of node {other}" in refused(api_request(api, "POST", SLICES, new))
        edited = {**theirs, "spec": {**theirs["spec"], "devices": [{"name": "gpu-1"}]}}
        refused(api_request(api, "PUT", path, edited))
        refused(api_request(api, "DELETE", path))
        assert api_request(control_plane.api, "GET", path).expect(200)["spec"] == theirs["spec"]

        cluster_wide = resource_slice(unique("all"), install.driver, node, [{"name": "gpu-0"}])
        del cluster_wide["spec"]["nodeName"]
        cluster_wide["spec"]["allNodes"] = True
        assert "without spec.nodeName" in refused(api_request(api, "POST", SLICES,
                                                              cluster_wide))
        foreign = resource_slice(unique("foreign"), "other.example.com", node,
                                 [{"name": "gpu-0"}])
        assert "of driver" in refused(api_request(api, "POST", SLICES, foreign))
        # Other API versions of the same resource are covered too.
        beta = {**new, "apiVersion": "resource.k8s.io/v1beta2"}
        refused(api_request(api, "POST", "/apis/resource.k8s.io/v1beta2/resourceslices", beta))
    finally:
        delete(control_plane.api, path)


def test_driver_is_refused_any_other_write(
    control_plane: ControlPlane, driver_on_node: tuple[Any, str], install: Install
) -> None:
    api, node = driver_on_node
    ns = install.namespace
    refused(api_request(api, "PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {
        "x": "y"}}}, content_type="application/merge-patch+json"))
    refused(api_request(api, "DELETE", f"/api/v1/nodes/{node}"))
    refused(api_request(api, "POST", "/apis/resource.k8s.io/v1/deviceclasses", {
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": unique("mine")}, "spec": {}}))
    daemonset = one(install.objects, "DaemonSet")["metadata"]["name"]
    refused(api_request(api, "DELETE", f"/apis/apps/v1/namespaces/{ns}/daemonsets/{daemonset}"))
    refused(api_request(api, "POST", f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "x", "image": "x"}]}}))
    refused(api_request(api, "POST", f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}))
    refused(api_request(api, "GET", f"/api/v1/namespaces/{ns}/secrets"))


def test_a_token_without_a_node_cannot_write_slices(
    control_plane: ControlPlane, driver_on_node: tuple[Any, str], install: Install,
    tmp_path: Path,
) -> None:
    _, node = driver_on_node
    unbound = client_with_token(control_plane, token_for(control_plane.api, install, None),
                                tmp_path)
    try:
        own = resource_slice(unique("mine"), install.driver, node, [{"name": "gpu-0"}])
        assert "no node-name claim" in refused(api_request(unbound, "POST", SLICES, own))
    finally:
        unbound.close()


def test_driver_runs_mps_daemon_pods_on_its_node_only(
    control_plane: ControlPlane, driver_on_node: tuple[Any, str], install: Install
) -> None:
    api, node = driver_on_node
    pods = f"/api/v1/namespaces/{install.namespace}/pods"
    image = one(install.objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0][
        "image"]
    uid = str(uuid.uuid4())
    node_uid = get(control_plane.api, f"/api/v1/nodes/{node}")["metadata"]["uid"]
    claim = ClaimMps((), Limits(None, ()), {}, ClaimRef("team-a", "train", uid))

    def spec(on: str, image: str = image) -> dict[str, Any]:
        settings = PodSettings(install.driver, install.namespace, on, image,
                               Path("/driver-root"), Path("/driver-root"))
        return pod_spec(settings, node_uid, Path("/var/lib/gpu-dra/mps") / uid, claim)

    def policy_in_force() -> bool:
        result = api_request(api, "POST", pods, spec(unique("other-node")),
                             query={"dryRun": "All"})
        if result.status == 403 and "only pods of its own node" in message(result):
            return True
        raise AssertionError(f"HTTP {result.status}: {message(result)}")

    wait_for(policy_in_force, "the chart's MPS pod policy in force")
    assert "chart's image" in refused(api_request(api, "POST", pods, spec(node, "busybox")))
    for field, value in (("livenessProbe", {"exec": {"command": ["sh", "-c", "id"]}}),
                         ("startupProbe", spec(node)["spec"]["containers"][0]["livenessProbe"]),
                         ("lifecycle", {"postStart": {"exec": {"command": ["sh"]}}})):
        smuggled = spec(node)  # a command of its own in the privileged container
        smuggled["spec"]["containers"][0][field] = value
        assert "no probe but" in refused(api_request(api, "POST", pods, smuggled)), field
    created_pod = api_request(api, "POST", pods, spec(node)).expect(201)
    path = f"{pods}/{created_pod['metadata']['name']}"
    listed = api_request(api, "GET", pods, query={
        "labelSelector": "app.kubernetes.io/component=mps-daemon"}).expect(200)
    assert [p["metadata"]["uid"] for p in listed["items"]] == [created_pod["metadata"]["uid"]]
    api_request(api, "DELETE", path, {"gracePeriodSeconds": 0}).expect(200)
    assert get(control_plane.api, path) is None


def allocated_claim(control_plane: ControlPlane, install: Install, node: str,
                    others: str) -> ClaimRef:
    """A claim allocated on ``node``: gpu-0 of the driver and nic-0 of driver ``others``
    (allocated by hand, as the scheduler would)."""
    claims = CLAIMS.format(ns=install.namespace)
    requests = [{"name": name, "exactly": {"deviceClassName": install.driver}}
                for name in ("gpu", "nic")]
    claim = create(control_plane.api, claims, {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": unique("claim")}, "spec": {"devices": {"requests": requests}}})
    claim["status"] = {"allocation": {
        "devices": {"results": [
            {"request": "gpu", "driver": install.driver, "pool": node, "device": "gpu-0"},
            {"request": "nic", "driver": others, "pool": node, "device": "nic-0"}]},
        "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node]}]}]}}}
    meta = claim["metadata"]
    api_request(control_plane.api, "PUT", f"{claims}/{meta['name']}/status",
                claim).expect(200)
    return ClaimRef(install.namespace, meta["name"], meta["uid"])


def test_driver_writes_only_its_own_entries_of_its_own_nodes_claims(
    control_plane: ControlPlane, driver_on_node: tuple[Any, str], install: Install,
    fake_node: Callable[..., str],
) -> None:
    """status.devices (KEP-4817): the chart's role is enough for the plugin's writes
    (server-side apply of its entries), and the API server's per-driver check keeps it
    to entries of its driver in claims allocated on its node."""
    api, node = driver_on_node
    others = "nic.example.com"
    ref = allocated_claim(control_plane, install, node, others)
    path = f"{CLAIMS.format(ns=ref.namespace)}/{ref.name}"
    ours = {"driver": install.driver, "pool": node, "device": "gpu-0",
            "data": {"uuid": "GPU-1"}}
    theirs = {"driver": others, "pool": node, "device": "nic-0", "data": {"mac": "x"}}
    api_writer(control_plane.api, others)(ref, apply_body(ref, [theirs]))

    def entries() -> list[tuple[str, str, dict[str, str]]]:
        return [(e["driver"], e["device"], e["data"])
                for e in get(control_plane.api, path)["status"]["devices"]]

    api_writer(api, install.driver)(ref, apply_body(ref, [ours]))
    assert entries() == [(others, "nic-0", {"mac": "x"}), (install.driver, "gpu-0",
                                                           {"uuid": "GPU-1"})]

    with pytest.raises(ApiError) as refusal:  # another driver's entry
        api_writer(api, install.driver)(ref, apply_body(ref, [ours, {**theirs, "data": {}}]))
    assert f'"{others}" is forbidden' in str(refusal.value)
    assert 'cannot associated-node:patch resource "resourceclaims/driver"' in \
        str(refusal.value)
    other_node = fake_node()
    elsewhere = allocated_claim(control_plane, install, other_node, others)
    with pytest.raises(ApiError) as refusal:  # a claim allocated on another node
        api_writer(api, install.driver)(elsewhere, apply_body(elsewhere, [
            {**ours, "pool": other_node}]))
    assert 'cannot arbitrary-node:patch resource "resourceclaims/driver"' in \
        str(refusal.value)
    assert "must be an allocated device" not in str(refusal.value)

    replaced = ClaimRef(ref.namespace, ref.name, str(uuid.uuid4()))  # deleted, made again
    with pytest.raises(ApiError) as refusal:
        api_writer(api, install.driver)(replaced, apply_body(replaced, [ours]))
    assert refusal.value.result.status in FINAL  # not retried
    assert "metadata.uid" in str(refusal.value) and "immutable" in str(refusal.value)

    api_writer(api, install.driver)(ref, apply_body(ref, []))
    assert entries() == [(others, "nic-0", {"mac": "x"})]
