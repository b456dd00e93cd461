"""The e2e control plane itself: version and API, DRA allocation by the real scheduler and
ResourceClaim controller, ResourceSlice validation by the real API server, fake nodes,
and a teardown that leaves no process behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from driver.devcluster.controlplane import (
    ClusterConfig,
    FakeNodeKeeper,
    LocalCluster,
    api_request,
    pinned_versions,
)
from tests.support.apiserver import (
    DEVICE_CLASSES,
    SLICES,
    ControlPlane,
    create,
    delete,
    device_class,
    events_for,
    get,
    pod_with_claim,
    resource_slice,
    submit_slice,
    unique,
    wait_for,
)


def gpu(name: str, memory: str = "80Gi") -> dict[str, object]:
    return {
        "name": name,
        "attributes": {"model": {"string": "fake-gpu"}, "index": {"int": int(name[-1])}},
        "capacity": {"memory": {"value": memory}},
    }


def test_server_is_the_pinned_version_with_resource_v1(control_plane: ControlPlane) -> None:
    versions = pinned_versions()
    assert versions is not None
    info = client.VersionApi(control_plane.api).get_code()
    assert info.git_version == versions.kubernetes
    served = client.ResourceV1Api(control_plane.api).get_api_resources()
    names = {r.name for r in served.resources}
    assert {"deviceclasses", "resourceclaims", "resourceclaimtemplates", "resourceslices",
            "devicetaintrules"} <= names


def test_kubeconfig_is_usable_by_a_fresh_client(control_plane: ControlPlane) -> None:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    with contextlib.closing(api):
        namespaces = client.CoreV1Api(api).list_namespace()
    assert "kube-system" in {ns.metadata.name for ns in namespaces.items}


def test_claim_from_template_is_allocated_by_the_scheduler_and_freed_with_the_pod(
    control_plane: ControlPlane,
    scheduler: LocalCluster,
    controller_manager: LocalCluster,
    fake_node: Callable[..., str],
    namespace: str,
) -> None:
    api = control_plane.api
    resource = client.ResourceV1Api(api)
    driver = f"{unique('smoke')}.example.com"
    node = fake_node()
    klass = unique("gpu")
    create(api, DEVICE_CLASSES, device_class(klass, driver))
    create(api, SLICES, resource_slice(unique("slice"), driver, node, [gpu("gpu-0")]))
    create(api, f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaimtemplates", {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": "one-gpu"},
        "spec": {"spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": klass}},
        ]}}},
    })
    pods = f"/api/v1/namespaces/{namespace}/pods"

    def schedule(pod_name: str) -> tuple[str, client.V1ResourceClaim]:
        create(api, pods, pod_with_claim(pod_name, {"resourceClaimTemplateName": "one-gpu"}))
        # The ResourceClaim controller creates the claim and records its name on the pod.
        claim_name = wait_for(
            lambda: next((s.get("resourceClaimName") for s in (get(api, f"{pods}/{pod_name}")
                          or {}).get("status", {}).get("resourceClaimStatuses", [])), None),
            f"the ResourceClaim controller to create {pod_name}'s claim",
        )
        claim = wait_for(
            lambda: (c := resource.read_namespaced_resource_claim(claim_name, namespace))
            .status and c.status.allocation and c,
            f"the scheduler to allocate claim {claim_name}",
        )
        bound = wait_for(
            lambda: (get(api, f"{pods}/{pod_name}") or {}).get("spec", {}).get("nodeName"),
            f"the scheduler to bind {pod_name}",
        )
        return bound, claim

    bound, claim = schedule("first")
    assert bound == node
    results = claim.status.allocation.devices.results
    assert [(r.driver, r.pool, r.device, r.request) for r in results] == [
        (driver, node, "gpu-0", "gpu")
    ]
    assert [ref.name for ref in claim.status.reserved_for] == ["first"]
    assert claim.metadata.owner_references[0].name == "first"

    # Without a kubelet, only a zero-grace delete removes a bound pod.
    delete(api, f"{pods}/first", grace_seconds=0)
    wait_for(lambda: get(api, f"/apis/resource.k8s.io/v1/namespaces/{namespace}"
                          f"/resourceclaims/{claim.metadata.name}") is None,
             "the pod's claim to be deleted after the pod")
    # The only device is free again: a second pod gets it.
    bound, claim = schedule("second")
    assert bound == node
    assert [r.device for r in claim.status.allocation.devices.results] == ["gpu-0"]
    delete(api, f"{pods}/second", grace_seconds=0)


def test_unsatisfiable_claim_stays_pending_with_the_schedulers_reason(
    control_plane: ControlPlane,
    scheduler: LocalCluster,
    fake_node: Callable[..., str],
    namespace: str,
) -> None:
    api = control_plane.api
    driver = f"{unique('pending')}.example.com"
    node = fake_node()
    klass = unique("gpu")
    create(api, DEVICE_CLASSES, device_class(klass, driver))
    create(api, SLICES, resource_slice(unique("slice"), driver, node, [gpu("gpu-0")]))
    # Four GPUs from a node that has one.
    create(api, f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims", {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "four-gpus"},
        "spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": klass, "count": 4}},
        ]}},
    })
    create(api, f"/api/v1/namespaces/{namespace}/pods",
           pod_with_claim("greedy", {"resourceClaimName": "four-gpus"}))

    # The scheduler may try before its informers saw the DeviceClass (then it says so and
    # retries), so wait for the verdict on the devices themselves.
    wait_for(
        lambda: [e for e in events_for(api, namespace, "greedy")
                 if e.get("reason") == "FailedScheduling"
                 and "cannot allocate all claims" in e.get("message", "")],
        "a FailedScheduling event saying the claim cannot be allocated",
    )
    # The event and the pod's condition are separate writes of the scheduler.
    def unschedulable() -> Any:
        pod = client.CoreV1Api(api).read_namespaced_pod("greedy", namespace)
        scheduled = {c.type: c for c in pod.status.conditions or []}.get("PodScheduled")
        return pod if scheduled is not None and scheduled.status == "False" else None

    pod = wait_for(unschedulable, "the pod's PodScheduled condition to be False")
    assert pod.status.phase == "Pending"
    assert not pod.spec.node_name
    scheduled = {c.type: c for c in pod.status.conditions}["PodScheduled"]
    assert scheduled.reason == "Unschedulable"
    claim = client.ResourceV1Api(api).read_namespaced_resource_claim("four-gpus", namespace)
    assert claim.status is None or claim.status.allocation is None


def test_resource_slices_get_the_api_servers_verdict(control_plane: ControlPlane) -> None:
    api = control_plane.api
    driver = f"{unique('verdict')}.example.com"
    node = unique("node")  # validation does not need the Node to exist
    good = resource_slice(unique("slice"), driver, node, [gpu("gpu-0"), gpu("gpu-1")])

    dry = submit_slice(api, good, dry_run=True)
    assert dry.accepted, str(dry)
    assert dry.object is not None and dry.object["spec"]["driver"] == driver
    assert get(api, f"{SLICES}/{good['metadata']['name']}") is None, "dry run stored it"

    stored = submit_slice(api, good, dry_run=False)
    assert stored.accepted, str(stored)
    assert get(api, f"{SLICES}/{good['metadata']['name']}") is not None

    bad = resource_slice(unique("slice"), driver, node, [gpu("GPU_0")])
    bad["spec"]["allNodes"] = True  # nodeName and allNodes are mutually exclusive
    verdict = submit_slice(api, bad, dry_run=True)
    assert not verdict.accepted
    assert verdict.status == 422 and verdict.reason == "Invalid"
    assert {"spec", "spec.devices[0].name"} <= verdict.fields(), str(verdict)
    assert "exactly one of `nodeName`" in verdict.message, str(verdict)

    typo = resource_slice(unique("slice"), driver, node, [gpu("gpu-0")])
    typo["spec"]["devices"][0]["capacities"] = {}
    strict = submit_slice(api, typo, dry_run=True)
    assert not strict.accepted and "capacities" in strict.message, str(strict)
    assert submit_slice(api, typo, dry_run=True, strict=False).accepted


def test_fake_node_is_ready_and_kept_fresh(control_plane: ControlPlane) -> None:
    api = control_plane.api
    keeper = FakeNodeKeeper(control_plane.cluster.api_client(), interval=0.5)
    name = unique("fresh-node")
    with keeper:
        keeper.add(name, capacity={"cpu": "4", "memory": "8Gi", "pods": "10"})
        node = client.CoreV1Api(api).read_node(name)
        ready = {c.type: c.status for c in node.status.conditions}
        assert ready == {"Ready": "True"}
        assert node.status.allocatable["cpu"] == "4"
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        first = (get(api, lease_path) or {})["spec"]["renewTime"]
        wait_for(lambda: (get(api, lease_path) or {})["spec"]["renewTime"] != first,
                 "the node lease to be renewed")
        assert keeper.errors == []
        keeper.remove(name)
    assert get(api, f"/api/v1/nodes/{name}") is None


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_teardown_leaves_no_process_even_when_the_body_fails(assets: Path) -> None:
    for binary in ("kube-scheduler", "kube-controller-manager"):
        if not (assets / binary).is_file():
            pytest.skip(f"{binary} not in {assets}")
    pids: dict[str, int] = {}
    workdir: Path | None = None
    with pytest.raises(RuntimeError, match="test body failed"), \
            LocalCluster(ClusterConfig(assets=assets)) as cluster:
        cluster.start_scheduler()
        cluster.start_controller_manager()
        pids, workdir = cluster.pids, cluster.workdir
        assert api_request(cluster.api_client(), "GET", "/readyz").status == 200
        raise RuntimeError("test body failed")
    assert set(pids) == {"etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager"}
    assert [n for n, p in pids.items() if not (_gone(p) and _group_gone(p))] == []
    assert workdir is not None and not workdir.exists()
