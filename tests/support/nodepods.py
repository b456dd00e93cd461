"""Pods for the real node and what their containers saw: each workload container prints
its device nodes, environment and mounts at start (busybox), then sleeps; tests read that
back through the API server's log endpoint (API server -> kubelet -> containerd), the way
a user checks a GPU pod."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.kube.api import api_request
from tests.support.apiserver import RESOURCE_V1, SLICES, create, events_for, get, wait_for
from tests.support.chart import Helm
from tests.support.claims import resource_claim
from tests.support.plugin import DRIVER
from tests.support.realnode import NODE_NAME, RealNode

RELEASE, CHART_NAMESPACE = "gpu-dra-driver", "gpu-dra"
BUSYBOX = "gpu-dra.local/busybox:1.35.0"
# What each container prints before it sleeps: one section per heading.
REPORT = r"""
echo '== dev'; ls -ln /dev /dev/nvidia-caps /dev/dri 2>&1
echo '== env'; env | sort
echo '== mounts'; awk '{print $5}' /proc/self/mountinfo
echo '== end'
exec sleep 3600
"""
_DEV = re.compile(r"^c\S+\s+\d+\s+\d+\s+\d+\s+(\d+),\s*(\d+)\s+.*\s(\S+)$")


@dataclass(frozen=True)
class ContainerView:
    """What one container saw at start."""

    devices: Mapping[str, tuple[int, int]]  # /dev path -> (major, minor)
    env: Mapping[str, str]
    mounts: frozenset[str]

    @property
    def gpus(self) -> set[str]:
        """The whole-GPU nodes, e.g. {'/dev/nvidia3'}."""
        return {p for p in self.devices if re.fullmatch(r"/dev/nvidia\d+", p)}


def parse_report(log: str) -> ContainerView:
    sections: dict[str, list[str]] = {}
    current, folder = None, "/dev"
    for line in log.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    if "end" not in sections:
        raise AssertionError(f"the container's report is incomplete:\n{log[-2000:]}")
    devices = {}
    for line in sections["dev"]:
        if line.endswith(":") and line.startswith("/dev"):
            folder = line[:-1]
        elif match := _DEV.match(line):
            devices[f"{folder}/{match.group(3)}"] = (int(match.group(1)), int(match.group(2)))
    env = dict(line.split("=", 1) for line in sections["env"] if "=" in line)
    return ContainerView(devices, env, frozenset(sections["mounts"]))


class Workloads:
    """Claims and pods in one namespace on the real node."""

    def __init__(self, api: Any, namespace: str, image: str) -> None:
        self.api, self.namespace, self.image = api, namespace, image
        self.claims = f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims"
        self.pods = f"/api/v1/namespaces/{namespace}/pods"

    def claim(self, name: str, device_class: str = DRIVER, count: int = 1,
              cel: str | None = None, match_attribute: str | None = None,
              config: Mapping[str, Any] | None = None) -> str:
        create(self.api, self.claims,
               resource_claim(name, device_class, count, cel, match_attribute, config))
        return name

    def pod(self, name: str, claims: Sequence[str] = (),
            containers: Sequence[str] = ("main",), command: str = REPORT) -> str:
        """A pod whose every container uses every claim in ``claims``."""
        spec: dict[str, Any] = {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": c, "image": self.image, "imagePullPolicy": "Never",
                "command": ["sh", "-c", command],
                "resources": {"claims": [{"name": claim} for claim in claims]},
            } for c in containers],
        }
        if claims:
            spec["resourceClaims"] = [{"name": c, "resourceClaimName": c} for c in claims]
        create(self.api, self.pods, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": name}, "spec": spec})
        return name

    def get_pod(self, name: str) -> dict[str, Any] | None:
        return get(self.api, f"{self.pods}/{name}")

    def phase(self, name: str) -> str | None:
        pod = self.get_pod(name)
        return None if pod is None else pod.get("status", {}).get("phase")

    def wait_running(self, name: str, timeout: float = 90) -> None:
        def running() -> bool:
            pod = self.get_pod(name) or {}
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if pod.get("status", {}).get("phase") == "Failed":
                raise AssertionError(f"pod {name} failed: {pod['status']}")
            return bool(statuses) and all("running" in s.get("state", {}) for s in statuses)

        wait_for(running, f"pod {name} running", timeout=timeout, interval=0.1,
                 fatal=(AssertionError,))

    def log(self, pod: str, container: str = "main") -> str:
        result = api_request(self.api, "GET", f"{self.pods}/{pod}/log",
                             query={"container": container})
        return str(result.expect(200))

    def view(self, pod: str, container: str = "main") -> ContainerView:
        """The container's report, once it printed all of it."""
        def report() -> ContainerView | None:
            log = self.log(pod, container)
            return parse_report(log) if "== end" in log else None

        return wait_for(report, f"{pod}/{container}'s report", timeout=30)

    def delete_pod(self, name: str, wait: bool = True) -> None:
        api_request(self.api, "DELETE", f"{self.pods}/{name}").expect(200, 202, 404)
        if wait:
            wait_for(lambda: self.get_pod(name) is None, f"pod {name} gone", timeout=90)

    def allocated(self, claim: str) -> list[str]:
        found = get(self.api, f"{self.claims}/{claim}") or {}
        allocation = found.get("status", {}).get("allocation") or {}
        return [r["device"] for r in allocation.get("devices", {}).get("results", [])]

    def claim_uid(self, claim: str) -> str:
        found = get(self.api, f"{self.claims}/{claim}")
        assert found is not None, f"claim {claim} does not exist"
        return str(found["metadata"]["uid"])

    def events(self, name: str) -> list[dict[str, Any]]:
        return events_for(self.api, self.namespace, name)

    def wait_event(self, name: str, reason: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: next((e for e in self.events(name) if e.get("reason") == reason),
                                     None), f"a {reason} event for {name}", timeout=timeout)


def kubelet_dra_metrics(text: str, driver: str) -> dict[str, tuple[float, float]]:
    """(count, sum) of the kubelet's DRA histograms for ``driver``, by metric and labels."""
    found: dict[str, tuple[float, float]] = {}
    for metric in ("dra_operations_duration_seconds", "dra_grpc_operations_duration_seconds"):
        for kind in ("count", "sum"):
            for match in re.finditer(rf"^{metric}_{kind}\{{([^}}]*)\}} (\S+)$", text, re.M):
                labels = match.group(1)
                if "driver_name" in labels and driver not in labels:
                    continue
                key = f"{metric}{{{labels}}}"
                count, total = found.get(key, (0.0, 0.0))
                value = float(match.group(2))
                found[key] = (value, total) if kind == "count" else (count, value)
    return found


@dataclass(frozen=True)
class DriverImage:
    archive: Path
    repository: str
    tag: str


@dataclass
class Driver:
    """The chart installed on the node by helm."""

    node: RealNode
    helm: Helm
    image: DriverImage
    values: list[str]

    def helm_args(self, *extra: str, values: bool = True) -> list[str]:
        assert self.node.cluster is not None
        return ["--kubeconfig", str(self.node.cluster.kubeconfig), "--namespace",
                CHART_NAMESPACE, *(self.values if values else []), *extra]

    def plugin_pods(self) -> list[dict[str, Any]]:
        pods = api_request(self.node.api, "GET", f"/api/v1/namespaces/{CHART_NAMESPACE}/pods",
                           query={"labelSelector": "app.kubernetes.io/name=gpu-dra-driver"})
        return list(pods.expect(200)["items"])

    def ready_pod(self) -> dict[str, Any] | None:
        """The one plugin pod, once it is Ready (None while there is none, or two)."""
        pods = [p for p in self.plugin_pods() if p["metadata"].get("deletionTimestamp") is None]
        if len(pods) != 1:
            return None
        conditions = pods[0].get("status", {}).get("conditions") or []
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        return pods[0] if ready else None

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        return wait_for(self.ready_pod, "the plugin pod Ready", timeout=timeout)

    def slices(self) -> list[dict[str, Any]]:
        items = api_request(self.node.api, "GET", SLICES).expect(200)["items"]
        return [s for s in items if s["spec"].get("nodeName") == NODE_NAME
                or s["spec"].get("pool", {}).get("name") == NODE_NAME]

    def plugin_log(self) -> str:
        pod = self.ready_pod() or self.plugin_pods()[0]
        name = pod["metadata"]["name"]
        result = api_request(self.node.api, "GET",
                             f"/api/v1/namespaces/{CHART_NAMESPACE}/pods/{name}/log")
        return str(result.expect(200))
