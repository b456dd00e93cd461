"""ResourceClaims as the node plugin reads them: from the API server or a local directory.

The kubelet sends only namespace, name and UID; the plugin reads the claim itself and
refuses one that was replaced (another UID under the same name) or is not allocated. Then
`claim_allocation` picks this driver's results in this node's pool, as plain values.
Nothing from a request becomes a path before it is checked: UIDs must be UUIDs, namespaces
DNS labels and names DNS subdomains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from driver.errors import PluginError
from driver.kube.api import api_call
from driver.kube.keepalive import Response, keepalive
from driver.kube.names import is_label, is_subdomain, is_uuid
from driver.plugin.config import ConfigError, OpaqueConfig, parse_allocation_configs
from driver.safeload import LoadError, json_document, read_text, yaml_document

MAX_CLAIM_FILE_BYTES = 3 * 1024 * 1024  # etcd's object limit is 1.5 MiB; leave room for YAML
API_VERSION = "resource.k8s.io/v1"  # what the plugin reads claims as


class ClaimError(PluginError):
    """This claim cannot be prepared; `reason` is a short code for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClaimRef:
    """What the kubelet sends for one claim."""

    namespace: str
    name: str
    uid: str

    def check(self) -> None:
        """Refuse identifiers that are not what Kubernetes allows (and could be paths)."""
        if not is_uuid(self.uid):
            raise ClaimError("bad_request", f"claim uid {self.uid!r} is not a UUID")
        if not is_label(self.namespace):
            raise ClaimError("bad_request",
                             f"claim namespace {self.namespace!r} is not a DNS label")
        if not is_subdomain(self.name):
            raise ClaimError("bad_request", f"claim name {self.name!r} is not a DNS subdomain")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class ClaimSource(Protocol):
    def get(self, ref: ClaimRef) -> dict[str, Any]:
        """The ResourceClaim object; ClaimError if it is missing, replaced or unallocated."""


class DirClaimSource:
    """`<dir>/resourceclaims/<namespace>/<name>.yaml`, each a ResourceClaim with
    status.allocation as the API server returns it (what `--local-dir` reads)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "resourceclaims"

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        path = self.root / ref.namespace / f"{ref.name}.yaml"
        try:
            # a regular file only, read without blocking: a FIFO must not hang the call
            claim = yaml_document(read_text(path, MAX_CLAIM_FILE_BYTES), str(path))
        except LoadError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                raise ClaimError("not_found", f"ResourceClaim {ref} not found "
                                              f"({path} does not exist)") from None
            raise ClaimError("bad_claim", f"ResourceClaim {ref}: {err}") from None
        return checked_claim(claim, ref)


class ApiClaimSource:
    """GET resource.k8s.io/v1 resourceclaims/<name> in the claim's namespace: raw, so the
    claim is read as sent, with fields newer than the client's models; on kept-alive
    connections of its own (`keepalive`) unless the client goes through a proxy."""

    def __init__(self, api_client: Any, timeout: float = 10.0) -> None:
        self.api = api_client
        self.timeout = timeout
        self._keepalive = keepalive(api_client)

    def _get(self, path: str) -> Response:
        if self._keepalive is not None:
            return self._keepalive.get(path, self.timeout)
        response = api_call(self.api, "GET", path, timeout=self.timeout)
        return Response(int(response.status), str(response.reason), response.read())

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        path = (f"/apis/{API_VERSION}/namespaces/{quote(ref.namespace, safe='')}"
                f"/resourceclaims/{quote(ref.name, safe='')}")
        try:
            response = self._get(path)
        except Exception as err:  # connection refused, timeout: the kubelet retries
            raise ClaimError("api_error",
                             f"ResourceClaim {ref}: cannot reach the API server: {err}") from None
        if response.status == 404:
            raise ClaimError("not_found", f"ResourceClaim {ref} not found")
        if response.status != 200:
            raise ClaimError("api_error", f"ResourceClaim {ref}: API server answered "
                                          f"{response.status} {response.reason}")
        try:
            claim = json_document(response.body, f"ResourceClaim {ref} from the API server")
        except LoadError as err:
            raise ClaimError("bad_claim", str(err)) from None
        return checked_claim(claim, ref)


def checked_claim(claim: Any, ref: ClaimRef) -> dict[str, Any]:
    """The claim if it is the one the kubelet means and it is allocated."""
    if not isinstance(claim, dict) or not isinstance(claim.get("metadata"), dict):
        raise ClaimError("bad_claim", f"ResourceClaim {ref}: not a ResourceClaim object")
    kind = (claim.get("apiVersion"), claim.get("kind"))
    if kind != (API_VERSION, "ResourceClaim"):
        raise ClaimError("bad_claim", f"ResourceClaim {ref}: apiVersion {kind[0]!r}, kind "
                                      f"{kind[1]!r}: must be {API_VERSION} ResourceClaim")
    uid = claim["metadata"].get("uid")
    if uid != ref.uid:
        raise ClaimError("uid_mismatch", f"ResourceClaim {ref} has uid {uid}, not {ref.uid}: "
                                         "it was deleted and created again")
    status = claim.get("status")
    if not isinstance(status, dict) or not status.get("allocation"):
        raise ClaimError("not_allocated", f"ResourceClaim {ref} is not allocated")
    return claim


@dataclass(frozen=True)
class AllocatedDevice:
    """One allocation result of this driver in this node's pool."""

    request: str  # as allocated: `gpu` or `gpu/sub0`
    pool: str
    device: str
    admin_access: bool
    share_id: str | None
    # consumedCapacity: what a share of a device with allowMultipleAllocations takes
    consumed: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_request(self) -> str:
        """What the kubelet matches against a container's claim request."""
        return self.request.split("/", 1)[0]


@dataclass(frozen=True)
class ClaimAllocation:
    devices: tuple[AllocatedDevice, ...]
    configs: tuple[OpaqueConfig, ...]


def claim_allocation(claim: dict[str, Any], driver: str, pool: str) -> ClaimAllocation:
    """This driver's results and configs; a result of ours in another pool is an error."""
    allocation = claim["status"]["allocation"]
    where = "status.allocation.devices"
    devices_part = allocation.get("devices") if isinstance(allocation, dict) else None
    if not isinstance(devices_part, dict):
        raise ClaimError("bad_claim", f"{where}: missing")
    results = devices_part.get("results") or []
    if not isinstance(results, list):
        raise ClaimError("bad_claim", f"{where}.results: must be a list")
    devices: list[AllocatedDevice] = []
    seen: dict[tuple[str, str | None], int] = {}
    for i, result in enumerate(results):
        at = f"{where}.results[{i}]"
        if not isinstance(result, dict):
            raise ClaimError("bad_claim", f"{at}: must be an object")
        if result.get("driver") != driver:
            continue
        for key in ("request", "pool", "device"):
            if not isinstance(result.get(key), str) or not result[key]:
                raise ClaimError("bad_claim", f"{at}.{key}: missing")
        if result["pool"] != pool:
            raise ClaimError("wrong_pool", f"{at}: device {result['device']} is in pool "
                                           f"{result['pool']}, not this node's pool {pool}")
        share_id = result.get("shareID")
        share_id = share_id if isinstance(share_id, str) else None
        # one device twice is a claim no scheduler makes, unless shared (distinct shareIDs)
        first = seen.setdefault((result["device"], share_id), i)
        if first != i:
            raise ClaimError("bad_claim", f"{at}: device {result['device']} is also "
                                          f"results[{first}]" + (f", shareID {share_id}"
                                                                 if share_id else ""))
        consumed = result.get("consumedCapacity") or {}
        if not isinstance(consumed, dict) or not all(
                isinstance(v, str) for v in consumed.values()):
            raise ClaimError("bad_claim", f"{at}.consumedCapacity: must map capacity names "
                                          "to quantities")
        devices.append(AllocatedDevice(
            request=result["request"], pool=result["pool"], device=result["device"],
            admin_access=result.get("adminAccess") is True,
            share_id=share_id, consumed=consumed))
    try:
        configs = parse_allocation_configs(devices_part.get("config"), driver)
    except ConfigError as err:
        raise ClaimError("bad_config", str(err)) from None
    return ClaimAllocation(tuple(devices), tuple(configs))
