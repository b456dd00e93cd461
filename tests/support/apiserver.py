"""Helpers for tests against the real control plane: raw object CRUD, polling with
deadlines, and submitting any ResourceSlice to the API server for its verdict."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from driver.devcluster.controlplane import LocalCluster
from driver.devcluster.node import poll
from driver.kube.api import api_request

T = TypeVar("T")

RESOURCE_V1 = "/apis/resource.k8s.io/v1"
SLICES = f"{RESOURCE_V1}/resourceslices"
DEVICE_CLASSES = f"{RESOURCE_V1}/deviceclasses"


def unique(prefix: str) -> str:
    """A DNS-1123 name no other test uses (the cluster is shared by the session)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(
    probe: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.25,
    fatal: tuple[type[Exception], ...] = (),
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` at the deadline.

    Exceptions from the probe count as "not yet" so transient API errors don't fail a test,
    but the last one is reported; ``fatal`` ones (the process under test died) propagate
    at once.
    """
    try:
        return poll(probe, what, timeout, interval, fatal)
    except TimeoutError as err:
        raise AssertionError(str(err)) from None


@dataclass(frozen=True)
class ControlPlane:
    """What the ``control_plane`` fixture yields."""

    cluster: LocalCluster
    kubeconfig: Path
    api: Any
    """A ``kubernetes.client.ApiClient`` for the cluster's admin user."""


# --- raw objects ----------------------------------------------------------------------------


def create(api: Any, path: str, obj: dict[str, Any]) -> dict[str, Any]:
    return dict(api_request(api, "POST", path, obj).expect(201))


def get(api: Any, path: str) -> dict[str, Any] | None:
    """The object, or None if it does not exist."""
    result = api_request(api, "GET", path)
    return None if result.status == 404 else dict(result.expect(200))


def delete(api: Any, path: str, grace_seconds: int | None = None) -> None:
    """Delete; ``grace_seconds=0`` removes a bound pod at once (there is no kubelet)."""
    body = None if grace_seconds is None else {"gracePeriodSeconds": grace_seconds}
    api_request(api, "DELETE", path, body).expect(200, 202, 404)


def events_for(api: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    """core/v1 Events about the object ``name`` in ``namespace``."""
    result = api_request(
        api,
        "GET",
        f"/api/v1/namespaces/{namespace}/events",
        query={"fieldSelector": f"involvedObject.name={name}"},
    )
    return list(result.expect(200).get("items", []))


def make_namespace(api: Any, name: str) -> str:
    """Create ``name`` with its ``default`` ServiceAccount, so pods are admitted at once
    whether or not the serviceaccount controller runs (it would race the first pod)."""
    create(api, "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": name}})
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}
    api_request(api, "POST", f"/api/v1/namespaces/{name}/serviceaccounts", sa).expect(201, 409)
    return name


# --- what the API server served ---------------------------------------------------------------

# The verb label is the HTTP method, except APPLY (server-side apply) and DELETECOLLECTION.
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"})


def api_writes(api: Any) -> Counter[str]:
    """Write requests the API server has served since it started, from its own
    ``apiserver_request_total``, as ``"VERB resource[/subresource]"`` -> count. Subtract
    two readings to count the writes in between (every client's: the metric has no user)."""
    text = api_request(api, "GET", "/metrics").expect(200)
    writes: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name != "apiserver_request_total" or labels["verb"] not in WRITE_VERBS:
                continue
            resource = "/".join(filter(None, (labels["resource"], labels["subresource"])))
            writes[f"{labels['verb']} {resource}"] += int(sample.value)
    return writes


# --- ResourceSlice verdicts -----------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the API server said about a submitted ResourceSlice."""

    accepted: bool
    status: int
    reason: str = ""
    message: str = ""
    causes: list[dict[str, Any]] = field(default_factory=list)
    object: dict[str, Any] | None = None
    """The object as the server would store it (defaults applied), when accepted."""

    def fields(self) -> set[str]:
        """The fields the server complained about, e.g. ``spec.devices[0].name``."""
        return {str(c.get("field", "")) for c in self.causes if c.get("field")}

    def __str__(self) -> str:
        if self.accepted:
            return f"accepted (HTTP {self.status})"
        head = f"rejected (HTTP {self.status} {self.reason})"
        if not self.causes:
            return f"{head}: {self.message}"
        causes = [f"  {c.get('field', '?')}: {c.get('message', '')}" for c in self.causes]
        return "\n".join([head, *causes])


def submit_slice(
    api: Any, slice_obj: dict[str, Any], dry_run: bool = True, strict: bool = True
) -> Verdict:
    """Submit ``slice_obj`` to the real API server (``resource.k8s.io/v1``) and report its
    verdict, without raising.

    ``dry_run`` runs every admission and validation stage but stores nothing. ``strict``
    (``fieldValidation=Strict``) makes unknown or duplicate fields an error instead of a
    warning, so a misspelt field in a driver-built slice cannot slip through.
    """
    query = {"fieldValidation": "Strict" if strict else "Warn"}
    if dry_run:
        query["dryRun"] = "All"
    result = api_request(api, "POST", SLICES, slice_obj, query=query)
    body = result.body if isinstance(result.body, dict) else {}
    if 200 <= result.status < 300:
        return Verdict(accepted=True, status=result.status, object=body)
    details = body.get("details") or {}
    return Verdict(
        accepted=False,
        status=result.status,
        reason=str(body.get("reason", "")),
        message=str(body.get("message", result.body)),
        causes=list(details.get("causes") or []),
    )


# --- DRA objects ----------------------------------------------------------------------------


def device_class(name: str, driver: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{driver}"'}}]},
    }


def resource_slice(
    name: str, driver: str, node: str, devices: list[dict[str, Any]], generation: int = 1
) -> dict[str, Any]:
    """A one-slice pool for ``node``, named after the node like a node-local driver does."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def pod_with_claim(name: str, claim: dict[str, str]) -> dict[str, Any]:
    """A pod with one container using one claim; ``claim`` is the podResourceClaim source,
    e.g. ``{"resourceClaimTemplateName": "t"}`` or ``{"resourceClaimName": "c"}``."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "resourceClaims": [{"name": "gpu", **claim}],
            "containers": [{
                "name": "main",
                "image": "registry.k8s.io/pause:3.10",
                "resources": {"claims": [{"name": "gpu"}]},
            }],
        },
    }
