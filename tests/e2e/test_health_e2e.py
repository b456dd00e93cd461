"""A GPU that fails while `gpu-dra plugin` runs, as the cluster sees it: the plugin on a
mock dgx-h100 (dynamic MIG) publishes its slices to the real API server; `gpu-dra mock
inject --xid 79` on GPU 3 makes the node's ResourceSlice carry a `gpu.dra.dev/xid=79`
NoSchedule taint on gpu-3 and every gpu-3 MIG device within seconds; the real
kube-scheduler then gives whole-GPU claims every other GPU and leaves one more claim
unschedulable; `--recover` removes the taints (default settings) and that claim gets
gpu-3.

With the kubelet stand-in (the kubelet's own DRA code) serving the node: under
`--health-evict` the taint is NoExecute, the real kube-controller-manager's
device-taint-eviction controller evicts the pod holding gpu-3, the kubelet unprepares its
claim (no CDI spec, nothing checkpointed) and, after `--recover`, a new pod gets gpu-3
again; and the kubelet's health cache, fed by the plugin's NodeWatchResources stream,
reads gpu-3 and its MIG devices Unhealthy with the XID in the message, then Healthy.

The inject-to-taint, inject-to-eviction, inject-to-Unhealthy and recover-to-untaint times
are printed (run with ``-s`` to see them); only generous bounds are asserted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from driver.devcluster.controlplane import ComponentError, LocalCluster
from driver.devcluster.node import ChildProcess
from driver.kube.api import api_request
from driver.plugin import cdi, checkpoint
from tests.support.apiserver import (
    RESOURCE_V1,
    SLICES,
    ControlPlane,
    create,
    events_for,
    get,
    pod_with_claim,
    wait_for,
)
from tests.support.claims import Claims, resource_claim
from tests.support.health import DRIVER, SICK, HealthNode
from tests.support.plugin import short_tmp
from tests.support.standin import KubeletStandin

XID_79 = {"key": f"{DRIVER}/xid", "value": "79", "effect": "NoSchedule"}
TAINT_BOUND_S = 10.0  # the target is 1 s; generous for a loaded machine
UNTAINT_BOUND_S = 15.0  # 10 s with the default 5 s check interval, plus the write
EVICT_BOUND_S = 30.0  # the taint, the controller-manager's informers, the kubelet's unprepare


def _published(node: HealthNode) -> None:
    wait_for(node.devices, f"{node.name}'s ResourceSlices", fatal=(ComponentError,))


def _stop(node: HealthNode, api: Any, *more: ChildProcess) -> None:
    """Stop the plugin (and ``more``), print their log tails (shown when the test fails)
    and delete the node's slices."""
    code = node.plugin.stop()
    print(f"--- gpu-dra plugin on {node.name} (exit {code}) ---\n{node.plugin.tail()}")
    for child in more:
        child.stop()
        print(f"--- {child.name} ---\n{child.tail()}")
    api_request(api, "DELETE", SLICES, query={
        "fieldSelector": f"spec.nodeName={node.name}"}).expect(200, 404)


@pytest.fixture
def health_node(control_plane: ControlPlane, fake_node: Any) -> Iterator[HealthNode]:
    """The node with its slices published; stopped and cleaned up by :func:`_stop`."""
    with short_tmp() as root:
        node = HealthNode(control_plane, fake_node(), root)
        try:
            _published(node)
            yield node
        finally:
            _stop(node, control_plane.api)


@pytest.fixture
def served_node(request: pytest.FixtureRequest, control_plane: ControlPlane,
                fake_node: Any, kubelet_standin: Callable[..., KubeletStandin]
                ) -> Iterator[tuple[HealthNode, KubeletStandin]]:
    """The node with the kubelet stand-in (the kubelet's own plugin manager and DRA
    manager), so pods bound to it are prepared; the plugin gets the extra flags in
    ``request.param``, registers and publishes."""
    with short_tmp() as root:
        name = fake_node()
        standin = kubelet_standin(name, root, "v1", DRIVER)
        node = HealthNode(control_plane, name, root, standin.registry_dir,
                          *getattr(request, "param", ()))
        try:
            standin.wait_registered(DRIVER)
            _published(node)
            yield node, standin
        finally:
            _stop(node, control_plane.api, standin)


def test_xid_79_taints_gpu_3_in_the_api_server_the_scheduler_avoids_it_until_recovered(
        control_plane: ControlPlane, scheduler: LocalCluster,
        controller_manager: LocalCluster, device_classes: None, namespace: str,
        health_node: HealthNode) -> None:
    node = health_node
    devices = node.devices() or {}
    gpus = sorted(name for name, d in devices.items()
                  if d["attributes"]["type"] == {"string": "gpu"})
    sick_migs = sorted(name for name in devices if name.startswith(f"gpu-{SICK}-mig-"))
    assert len(gpus) == 8 and f"gpu-{SICK}" in gpus and sick_migs, sorted(devices)
    assert node.taints() == {}

    begin = time.monotonic()
    node.inject("--xid", "79")
    recorded = time.monotonic() - begin
    taint_s = recorded + node.timed(
        lambda: set(node.taints() or {}) >= {f"gpu-{SICK}", *sick_migs},
        "gpu-3 and its MIG devices to be tainted in the API server", TAINT_BOUND_S)
    taints = node.taints() or {}
    assert set(taints) == {f"gpu-{SICK}", *sick_migs}, sorted(taints)  # no other GPU
    assert all(XID_79 in device_taints for device_taints in taints.values()), taints
    print(f"\ninject --xid 79 to taint in the API server: {taint_s:.2f}s "
          f"(the inject command itself {recorded:.2f}s)")

    claims = Claims(control_plane.api, namespace, node.name)
    healthy = [f"claim-{i}" for i in range(len(gpus) - 1)]
    for name in healthy:
        claims.request(name)
    got = sorted(d for name in healthy for d in claims.wait_allocated(name))
    assert got == sorted(g for g in gpus if g != f"gpu-{SICK}")
    claims.request("waits")
    said = claims.wait_unschedulable("waits")
    print(f"the scheduler on the claim left over: {said}")

    begin = time.monotonic()
    node.inject("--recover")
    recorded = time.monotonic() - begin
    untaint_s = recorded + node.timed(lambda: node.taints() == {},
                                      "gpu-3's taints to leave the API server", UNTAINT_BOUND_S)
    print(f"inject --recover to untainted in the API server: {untaint_s:.2f}s "
          f"(the inject command itself {recorded:.2f}s)")
    assert claims.wait_allocated("waits") == [f"gpu-{SICK}"]


def held_pod(api: Any, namespace: str, node: str, name: str, uuid: str) -> dict[str, Any]:
    """A pod on ``node`` whose claim, from a template, asks for the GPU ``uuid``; it
    terminates gracefully (30 s, as pods do by default), so its deletion waits for the
    kubelet."""
    create(api, f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaimtemplates", {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": {"name": name},
        "spec": {"spec": resource_claim(
            name, cel=f'device.attributes["{DRIVER}"].uuid == "{uuid}"')["spec"]}})
    pod = pod_with_claim(name, {"resourceClaimTemplateName": name})
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    pod["spec"]["terminationGracePeriodSeconds"] = 30
    return create(api, f"/api/v1/namespaces/{namespace}/pods", pod)


def prepared_devices(standin: KubeletStandin, uid: str) -> tuple[dict[str, Any], list[str]]:
    """The pod's one claim as the stand-in prepared it, and the devices it got."""
    [claim] = standin.wait_pod(uid, "prepared")["claims"]
    return claim, [d["device"] for d in claim["drivers"][DRIVER]]


@pytest.mark.parametrize("served_node", [("--health-evict",)], indirect=True)
def test_with_health_evict_xid_79_evicts_the_pod_on_gpu_3_and_its_claim_is_unprepared(
        control_plane: ControlPlane, scheduler: LocalCluster,
        controller_manager: LocalCluster, device_classes: None, namespace: str,
        served_node: tuple[HealthNode, KubeletStandin]) -> None:
    node, standin = served_node
    api, sick = control_plane.api, f"gpu-{SICK}"
    uuid = (node.devices() or {})[sick]["attributes"]["uuid"]["string"]
    pod = held_pod(api, namespace, node.name, "held", uuid)
    claim, devices = prepared_devices(standin, pod["metadata"]["uid"])
    assert devices == [sick]
    spec = node.folders.cdi_root / cdi.spec_file_name(DRIVER, claim["uid"])
    saved = checkpoint.load(node.folders.checkpoint)
    assert spec.is_file() and saved is not None and claim["uid"] in saved.claims

    begin = time.monotonic()
    node.inject("--xid", "79")
    node.timed(lambda: {**XID_79, "effect": "NoExecute"} in (node.taints() or {}).get(sick, []),
               "gpu-3's NoExecute taint in the API server", TAINT_BOUND_S)
    pod_path = f"/api/v1/namespaces/{namespace}/pods/held"
    node.timed(lambda: get(api, pod_path) is None, "the pod on gpu-3 to be evicted and removed",
               EVICT_BOUND_S)
    evicted_s = time.monotonic() - begin
    reasons = wait_for(lambda: {e.get("reason") for e in events_for(api, namespace, "held")}
                       & {"DeviceTaintManagerEviction"}, "the controller-manager's eviction event")
    assert reasons == {"DeviceTaintManagerEviction"}
    standin.wait_pod(pod["metadata"]["uid"], "unprepared")
    saved = checkpoint.load(node.folders.checkpoint)
    assert not spec.exists() and saved is not None and saved.claims == {}
    claims = Claims(api, namespace, node.name)
    wait_for(lambda: claims.allocated(claim["name"]) is None
             and get(api, f"{claims.claims}/{claim['name']}") is None,
             "the evicted pod's claim to be deleted")
    print(f"\ninject --xid 79 (NoExecute) to the pod evicted, unprepared and removed: "
          f"{evicted_s:.2f}s")

    node.inject("--recover")
    node.timed(lambda: node.taints() == {}, "gpu-3's taints to leave the API server",
               UNTAINT_BOUND_S)
    again = held_pod(api, namespace, node.name, "again", uuid)
    assert prepared_devices(standin, again["metadata"]["uid"])[1] == [sick]


def test_the_kubelets_health_cache_shows_gpu_3_unhealthy_with_the_xid_then_healthy(
        control_plane: ControlPlane, served_node: tuple[HealthNode, KubeletStandin]) -> None:
    node, standin = served_node
    devices = set(node.devices() or {})
    sick = {name for name in devices if name == f"gpu-{SICK}" or
            name.startswith(f"gpu-{SICK}-mig-")}

    def health() -> dict[str, tuple[str, str]]:
        return {device: (d["health"], d.get("message", ""))
                for (pool, device), d in standin.device_health(DRIVER).items()
                if pool == node.name}

    def unhealthy() -> set[str]:
        return {name for name, (said, _) in health().items() if said != "Healthy"}

    wait_for(lambda: set(health()) == devices and not unhealthy(),
             "the stand-in to hear every device healthy")
    begin = time.monotonic()
    node.inject("--xid", "79")
    node.timed(lambda: unhealthy() == sick, "gpu-3 and its MIG devices to be Unhealthy in the "
               "kubelet's health cache", TAINT_BOUND_S)
    unhealthy_s = time.monotonic() - begin
    seen = health()
    assert {seen[name][0] for name in sick} == {"Unhealthy"}
    assert all("79" in seen[name][1] and "fallen off the bus" in seen[name][1]
               for name in sick), seen
    print(f"\ninject --xid 79 to Unhealthy in the kubelet's health cache: {unhealthy_s:.2f}s")

    node.inject("--recover")
    node.timed(lambda: not unhealthy(), "gpu-3 to be Healthy again in the kubelet's cache",
               UNTAINT_BOUND_S)
    assert set(health()) == devices
