"""What our slices cost the real kube-scheduler, in the style of upstream scheduler_perf's
``SchedulingWithResourceClaimTemplate``: fake Nodes whose pools our publisher wrote, a
ResourceClaimTemplate, pods created 8 at a time, each pod's latency from its create call
returning to a watch seeing it bound, and the scheduler's own time per pod from its
/metrics."""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes.client import CoreV1Api
from kubernetes.watch.watch import iter_resp_lines

from driver.devcluster.controlplane import FakeNodeKeeper, LocalCluster
from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.kube.api import api_request
from driver.nvml.mock import load_profile, mock_provider
from driver.nvml.profile import PROFILES_DIR
from driver.resourceslice.build import (
    MAX_DEVICES_WITH_COUNTERS_OR_TAINTS,
    CounterLayout,
    MigMode,
    SliceOptions,
    build_slices,
)
from driver.resourceslice.publish import ApiPublisher, SlicePool
from tests.support.apiserver import RESOURCE_V1, SLICES, pod_with_claim, wait_for
from tests.support.claims import resource_claim
from tests.support.plugin import DRIVER

MIG_CLASS = f"mig.{DRIVER}"
H100_1G10GB = 19  # GPU instance profile id of 1g.10gb on H100 80 GB (_models.yaml)
CREATORS = 8  # pods created in parallel, as scheduler_perf's createPods does (with 30)


@dataclass(frozen=True)
class Layout:
    """How every node's pool is published: the machine and our publisher's options."""

    mig_mode: MigMode
    static_mig_gpus: tuple[int, ...] = ()
    """GPUs in MIG mode, each split into seven 1g.10gb instances (a static MIG node)."""
    counter_layout: CounterLayout = "split"
    by_kind: bool = False
    """An experiment, posted rather than published: the builder's devices and counter sets
    unchanged, but the whole GPUs first and then the MIG devices profile by profile."""


LAYOUTS: dict[str, Layout] = {
    # dgx-h100, MIG off: 8 whole GPUs, the baseline.
    "plain": Layout("static"),
    # GPUs 0-3 whole, 4-7 as 7x 1g.10gb each (mig-parted's "mixed"): 4 + 28 devices.
    "static-mig": Layout("static", static_mig_gpus=(4, 5, 6, 7)),
    # Every GPU whole and every MIG placement, with counters: 208 devices in 5 slices.
    "dynamic-mig": Layout("dynamic"),
    "dynamic-mig-by-kind": Layout("dynamic", by_kind=True),
}

CLAIMS: dict[str, dict[str, Any]] = {
    "gpu": resource_claim("gpu")["spec"],
    "mig-1g": resource_claim("mig-1g", MIG_CLASS,
                             cel=f'device.attributes["{DRIVER}"].profile == "1g.10gb"')["spec"],
    "nvlink-pair": resource_claim("nvlink-pair", count=2,
                                  match_attribute=f"{DRIVER}/nvlinkIsland")["spec"],
}


GIVES = {"gpu": r"gpu-\d+", "mig-1g": r"gpu-\d+-mig-1g10gb-\d+", "nvlink-pair": r"gpu-\d+"}
"""The device names each claim kind must get (our names: `gpu-<minor>`, MIG devices
`gpu-<minor>-mig-<profile>-<start>`)."""


def fits(layout: str, claim: str) -> bool:
    """Whether a node of ``layout`` has a device for ``claim`` at all."""
    return not (claim == "mig-1g" and layout == "plain")


def dgx_h100(layout: Layout, folder: Path) -> Inventory:
    """The dgx-h100 mock, with ``layout.static_mig_gpus`` in MIG mode (written as a
    profile file under ``folder``)."""
    if not layout.static_mig_gpus:
        return discover(mock_provider("dgx-h100"))
    profile = yaml.safe_load((PROFILES_DIR / "dgx-h100.yaml").read_text())
    for gpu in profile["gpus"]:
        if gpu["minor"] in layout.static_mig_gpus:
            gpu["mig"] = {"enabled": True, "gpuInstances": [
                {"profileId": H100_1G10GB, "start": s, "computeInstances": [{"profileId": 0}]}
                for s in range(7)]}
    path = folder / "dgx-h100-static-mig.yaml"
    path.write_text(yaml.safe_dump(profile))
    load_profile(str(path))  # a bad edit fails here, naming the field
    return discover(mock_provider(str(path)))


def by_kind(slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``slices`` with their devices re-ordered (whole GPUs, then each MIG profile's
    devices GPU by GPU) and re-packed; the counter sets stay where they were."""
    counters = [s for s in slices if "sharedCounters" in s["spec"]]
    devices = [d for s in slices for d in s["spec"].get("devices", [])]
    kinds = list(dict.fromkeys(d["attributes"].get("profile", {}).get("string", "")
                               for d in devices))
    devices.sort(key=lambda d: kinds.index(d["attributes"].get("profile", {}).get("string", "")))
    chunks = [devices[i:i + MAX_DEVICES_WITH_COUNTERS_OR_TAINTS]
              for i in range(0, len(devices), MAX_DEVICES_WITH_COUNTERS_OR_TAINTS)]
    template = next(s for s in slices if "devices" in s["spec"])
    out = list(counters)
    for chunk in chunks:
        one = copy.deepcopy(template)
        one["spec"]["devices"] = chunk
        out.append(one)
    for index, one in enumerate(out):
        one["metadata"]["name"] = f"{one['spec']['nodeName']}-{DRIVER}-{index}"
        one["spec"]["pool"]["resourceSliceCount"] = len(out)
    return out


@contextmanager
def ready_nodes(cluster: LocalCluster, prefix: str, count: int) -> Iterator[list[str]]:
    """``count`` Ready fake Nodes (the pools' owners); heartbeats rare, so they cost the
    API server nothing while measuring (no node lifecycle controller marks them NotReady).
    Deleted afterwards."""
    api = cluster.api_client()
    names = [f"{prefix}-{i:04d}" for i in range(count)]
    try:
        with FakeNodeKeeper(api, interval=3600) as keeper:
            for name in names:
                keeper.add(name)
            yield names
            for name in names:
                keeper.remove(name)
    finally:
        api.close()


@contextmanager
def posted(api: Any, nodes: Sequence[str], inventory: Inventory,
           layout: Layout) -> Iterator[float]:
    """:func:`by_kind` of every node's slices, created directly; deleted afterwards."""
    made = [by_kind(build_slices(inventory, SliceOptions(DRIVER, n, layout.mig_mode,
                                                         layout.counter_layout), 1))
            for n in nodes]
    names = [s["metadata"]["name"] for pool in made for s in pool]
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: api_request(api, "POST", SLICES, s).expect(201),
                          [s for one in made for s in one]))
        yield time.monotonic() - t0
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: api_request(api, "DELETE", f"{SLICES}/{n}").expect(200, 404),
                          names))


@contextmanager
def published(api: Any, nodes: Sequence[str], inventory: Inventory,
              layout: Layout) -> Iterator[float]:
    """Every node's pool published by our ApiPublisher (4 at a time); yields the seconds
    it took; the pools are deleted afterwards."""
    publishers = [ApiPublisher(api, SlicePool(DRIVER, n, layout.mig_mode, layout.counter_layout))
                  for n in nodes]
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: p.publish(inventory, timeout=120), publishers))
        yield time.monotonic() - t0
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: p.cleanup(), publishers))


@dataclass(frozen=True)
class Run:
    """One measured batch: pods/s from the first create call to the last pod bound, and
    each pod's latency (create call returned -> watch saw spec.nodeName)."""

    pods: int
    seconds: float
    creating: float
    """Seconds from the first create call to the last one returning."""
    latencies: tuple[float, ...]
    rewatches: int
    """How often the API server closed our watch (pods seen bound late, by a reconnect)."""

    @property
    def pods_per_second(self) -> float:
        return self.pods / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def schedule(api: Any, namespace: str, claim: str, pods: int, timeout: float) -> Run:
    """Create the template and ``pods`` pods using it; wait until all are bound."""
    templates = f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaimtemplates"
    api_request(api, "POST", templates, {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": {"name": claim}, "spec": {"spec": CLAIMS[claim]},
    }).expect(201)
    created: dict[str, float] = {}
    bound: dict[str, float] = {}
    done = threading.Event()
    stopped = threading.Event()
    rewatches: list[str] = []
    watching: list[Any] = []

    def follow() -> None:
        """Record when each pod is first seen bound. An overloaded API server closes a
        watcher that falls behind ("Forcing ... watcher close due to unresponsiveness"),
        the scheduler's as well as ours: like an informer, watch again from the last
        resourceVersion seen (list again when that is too old)."""
        version = ""
        while not stopped.is_set():
            if not version:
                listed = api_request(api, "GET", f"/api/v1/namespaces/{namespace}/pods",
                                     query={"fieldSelector": "spec.nodeName!="}).expect(200)
                for pod in listed["items"]:
                    bound.setdefault(pod["metadata"]["name"], time.monotonic())
                version = listed["metadata"]["resourceVersion"]
            resp = CoreV1Api(api).list_namespaced_pod(
                namespace, watch=True, resource_version=version, field_selector="spec.nodeName!=",
                timeout_seconds=int(timeout) + 60, _preload_content=False)
            watching[:] = [resp]
            with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
                for line in iter_resp_lines(resp):
                    event = json.loads(line)
                    if event["type"] == "ERROR":  # 410 Gone: too old, list again
                        version = ""
                        break
                    pod = event["object"]
                    version = pod["metadata"]["resourceVersion"]
                    bound.setdefault(pod["metadata"]["name"], time.monotonic())
                    if len(bound) == pods:
                        done.set()
                        return
            rewatches.append(version)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()

    def create(i: int) -> None:
        name = f"pod-{i:05d}"
        api_request(api, "POST", f"/api/v1/namespaces/{namespace}/pods",
                    pod_with_claim(name, {"resourceClaimTemplateName": claim})).expect(201)
        created[name] = time.monotonic()

    try:
        start = time.monotonic()
        with ThreadPoolExecutor(CREATORS) as creators:
            list(creators.map(create, range(pods)))
        wait_for(lambda: done.is_set(), f"{pods} pods bound (so far {len(bound)})", timeout)
    finally:
        stopped.set()
        for resp in watching:
            with contextlib.suppress(ValueError, OSError, RuntimeError):  # ended already
                resp.shutdown()
        watcher.join(timeout=10)
    return Run(pods, max(bound.values()) - start, max(created.values()) - start,
               tuple(bound[n] - created[n] for n in created), len(rewatches))


def spent(metrics: Mapping[str, float], histogram: str, label: str = "") -> tuple[float, float]:
    """A scheduler histogram's (count, sum of seconds) so far, over its series whose labels
    include ``label`` (``key="value"``)."""
    count = total = 0.0
    for key, value in metrics.items():
        name, _, labels = key.partition("{")
        if label in labels and name == f"scheduler_{histogram}_seconds_count":
            count += value
        elif label in labels and name == f"scheduler_{histogram}_seconds_sum":
            total += value
    return count, total


# What per_pod reports: the scheduling attempts (algorithm and binding cycle, its API
# writes included), PreFilter + Filter (where DRA gathers the slices and its allocator
# runs, once per node looked at), and PreBind (DRA writes the claim's allocation).
STAGES = {
    "attempt": [("scheduling_attempt_duration", "")],
    "filter": [("framework_extension_point_duration", f'extension_point="{point}"')
               for point in ("PreFilter", "Filter")],
    "prebind": [("framework_extension_point_duration", 'extension_point="PreBind"')],
}


def per_pod(before: Mapping[str, float], after: Mapping[str, float],
            pods: int) -> dict[str, float]:
    """The scheduler's attempts per pod and mean milliseconds per pod in each of
    :data:`STAGES`, between two scrapes of its /metrics."""
    out: dict[str, float] = {}
    for stage, series in STAGES.items():
        diffs = [(spent(after, h, lab)[i] - spent(before, h, lab)[i], i)
                 for h, lab in series for i in (0, 1)]
        if stage == "attempt":
            out["attempts_per_pod"] = round(sum(d for d, i in diffs if i == 0) / pods, 2)
        out[f"{stage}_ms_per_pod"] = round(sum(d for d, i in diffs if i == 1) / pods * 1000, 2)
    return out


def clear(api: Any, namespace: str) -> None:
    """Delete the namespace's pods at once (no kubelet runs them) and wait for the
    garbage collector to delete their claims, so the devices are free again."""
    api_request(api, "DELETE", f"/api/v1/namespaces/{namespace}/pods",
                query={"gracePeriodSeconds": "0"}).expect(200)
    claims = f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims"
    wait_for(lambda: not api_request(api, "GET", claims).expect(200)["items"],
             f"the claims of {namespace} deleted", timeout=300, interval=1)
