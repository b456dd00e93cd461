"""ResourceClaims as tests make them, and pods pinned to a node that use them, so the real
scheduler allocates the claims there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from driver.kube.api import api_request
from tests.support.apiserver import (
    RESOURCE_V1,
    create,
    delete,
    events_for,
    get,
    pod_with_claim,
    wait_for,
)
from tests.support.plugin import DRIVER


def resource_claim(name: str, device_class: str = DRIVER, count: int = 1,
                   cel: str | None = None, match_attribute: str | None = None,
                   config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A claim with one request `gpu` for ``count`` devices of ``device_class``; ``cel``
    a selector, ``match_attribute`` a constraint over the request, ``config`` our opaque
    parameters for it."""
    exactly: dict[str, Any] = {"deviceClassName": device_class, "count": count}
    if cel:
        exactly["selectors"] = [{"cel": {"expression": cel}}]
    devices: dict[str, Any] = {"requests": [{"name": "gpu", "exactly": exactly}]}
    if match_attribute:
        devices["constraints"] = [{"requests": ["gpu"], "matchAttribute": match_attribute}]
    if config is not None:
        devices["config"] = [{"requests": ["gpu"],
                              "opaque": {"driver": DRIVER, "parameters": dict(config)}}]
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name}, "spec": {"devices": devices}}


class Claims:
    """ResourceClaims in one namespace, each with a pod pinned to one node so that the
    scheduler allocates it there."""

    def __init__(self, api: Any, namespace: str, node: str) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.claims = f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims"
        self.pods = f"/api/v1/namespaces/{namespace}/pods"

    def request(self, name: str, device_class: str = DRIVER, count: int = 1,
                cel: str | None = None, match_attribute: str | None = None) -> None:
        create(self.api, self.claims,
               resource_claim(name, device_class, count, cel, match_attribute))
        pod = pod_with_claim(name, {"resourceClaimName": name})
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": self.node}
        create(self.api, self.pods, pod)

    def allocated(self, name: str) -> list[str] | None:
        """The devices allocated to claim ``name``, None while it has none."""
        claim = get(self.api, f"{self.claims}/{name}") or {}
        allocation = claim.get("status", {}).get("allocation")
        if not allocation:
            return None
        results = allocation["devices"]["results"]
        assert {(r["driver"], r["pool"]) for r in results} == {(DRIVER, self.node)}
        return [r["device"] for r in results]

    def wait_allocated(self, name: str, timeout: float = 60.0) -> list[str]:
        return wait_for(lambda: self.allocated(name), f"the scheduler to allocate {name}",
                        timeout=timeout)

    def wait_bound(self, name: str) -> str:
        """Wait until pod ``name`` is bound; its node. kube-scheduler v1.37.2 counts a
        claim's consumed capacity twice while it is both allocated and still in flight
        (dra_manager.go GatherAllocatedState, until PreBind ends): a claim scheduled in
        that window can find a shared GPU full though it has room, so tests that expect
        an exact packing place one pod at a time."""
        return wait_for(lambda: ((get(self.api, f"{self.pods}/{name}") or {})
                                 .get("spec", {}).get("nodeName")),
                        f"pod {name} to be bound")

    def wait_unschedulable(self, name: str) -> str:
        """Wait until the scheduler says it cannot allocate ``name``'s claim on the node
        (a message about anything else, e.g. a node its informer has not seen yet, is not
        the answer asked for); the claim must still be unallocated after that. The
        scheduler's message."""
        def message() -> str | None:
            return next((e["message"] for e in events_for(self.api, self.namespace, name)
                         if e.get("reason") == "FailedScheduling"
                         and "cannot allocate all claims" in e.get("message", "")), None)

        said = wait_for(message, f"the scheduler to find no devices for {name}")
        assert self.allocated(name) is None
        return said

    def release(self, name: str) -> None:
        """Delete the pod and its claim; wait until the claim (and its devices) are gone."""
        delete(self.api, f"{self.pods}/{name}", grace_seconds=0)
        delete(self.api, f"{self.claims}/{name}")
        wait_for(lambda: get(self.api, f"{self.claims}/{name}") is None,
                 f"claim {name} to be deallocated and deleted")

    def all_allocated(self) -> dict[str, list[str]]:
        items = api_request(self.api, "GET", self.claims).expect(200)["items"]
        return {c["metadata"]["name"]: [r["device"] for r in
                                        c["status"]["allocation"]["devices"]["results"]]
                for c in items if c.get("status", {}).get("allocation")}
