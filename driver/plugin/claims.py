"""ResourceClaims as the node plugin reads them: from the API server or a local directory.

The kubelet sends only namespace, name and UID; the plugin reads the claim itself and
refuses one that was replaced (another UID under the same name) or is not allocated. Then
`claim_allocation` picks this driver's results in this node's pool, as plain values.
Nothing from a request becomes a path before it is checked: UIDs must be UUIDs, namespaces
DNS labels and names DNS subdomains.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from driver.errors import PluginError
from driver.plugin.config import ConfigError, OpaqueConfig, parse_allocation_configs

MAX_CLAIM_FILE_BYTES = 3 * 1024 * 1024  # etcd's object limit is 1.5 MiB; leave room for YAML

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
        if not _UUID.match(self.uid):
            raise ClaimError("bad_request", f"claim uid {self.uid!r} is not a UUID")
        if not _LABEL.match(self.namespace):
            raise ClaimError("bad_request",
                             f"claim namespace {self.namespace!r} is not a DNS label")
        if len(self.name) > 253 or not _SUBDOMAIN.match(self.name):
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
            with path.open("rb") as f:
                data = f.read(MAX_CLAIM_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ClaimError("not_found", f"ResourceClaim {ref} not found "
                                          f"({path} does not exist)") from None
        except OSError as err:
            raise ClaimError("not_found", f"ResourceClaim {ref}: cannot read {path}: "
                                          f"{err.strerror}") from None
        if len(data) > MAX_CLAIM_FILE_BYTES:
            raise ClaimError("bad_claim", f"ResourceClaim {ref}: {path} is larger than "
                                          f"{MAX_CLAIM_FILE_BYTES} bytes")
        try:
            claim = yaml.load(data, Loader=_Loader)  # a safe loader (libyaml when built)
        except yaml.YAMLError as err:
            raise ClaimError("bad_claim", f"ResourceClaim {ref}: {path} is not YAML: "
                                          f"{err}") from None
        return checked_claim(claim, ref)


class ApiClaimSource:
    """GET resource.k8s.io/v1 resourceclaims/<name> in the claim's namespace."""

    def __init__(self, api_client: Any, timeout: float = 10.0) -> None:
        from kubernetes import client

        self.api = client.ResourceV1Api(api_client)
        self.timeout = timeout

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            # not preloaded: the raw urllib3 response, so the claim is read as sent
            response: Any = self.api.read_namespaced_resource_claim(
                ref.name, ref.namespace, _preload_content=False, _request_timeout=self.timeout)
        except ApiException as err:
            if err.status == 404:
                raise ClaimError("not_found", f"ResourceClaim {ref} not found") from None
            raise ClaimError("api_error", f"ResourceClaim {ref}: API server answered "
                                          f"{err.status} {err.reason}") from None
        except Exception as err:  # connection refused, timeout: the kubelet retries
            raise ClaimError("api_error",
                             f"ResourceClaim {ref}: cannot reach the API server: {err}") from None
        return checked_claim(json.loads(response.data), ref)


def checked_claim(claim: Any, ref: ClaimRef) -> dict[str, Any]:
    """The claim if it is the one the kubelet means and it is allocated."""
    if not isinstance(claim, dict) or not isinstance(claim.get("metadata"), dict):
        raise ClaimError("bad_claim", f"ResourceClaim {ref}: not a ResourceClaim object")
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
        devices.append(AllocatedDevice(
            request=result["request"], pool=result["pool"], device=result["device"],
            admin_access=result.get("adminAccess") is True,
            share_id=share_id if isinstance(share_id, str) else None))
    try:
        configs = parse_allocation_configs(devices_part.get("config"), driver)
    except ConfigError as err:
        raise ClaimError("bad_config", str(err)) from None
    return ClaimAllocation(tuple(devices), tuple(configs))
