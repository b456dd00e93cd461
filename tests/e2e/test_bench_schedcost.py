"""What our slices cost the real kube-scheduler v1.37.2 (issue 17, item 3), in the style of
upstream scheduler_perf's ``SchedulingWithResourceClaimTemplate``: fake Nodes whose pools
our ApiPublisher wrote (dgx-h100 with MIG off, static MIG, dynamic MIG), one
ResourceClaimTemplate per claim kind (one GPU, a 1g.10gb MIG device, an NVLink pair with
matchAttribute), pods created 8 at a time, each bound by the scheduler.

pods/s is from the first pod's create call to the last pod bound; latency is each pod's,
from its create call returning to a watch seeing it bound (p50, p99 in extra_info), with
the RSS of kube-apiserver, etcd and kube-scheduler once every pool is published, and the
scheduler's own time per pod (Filter, whole attempt) from its /metrics.

The default run is small (10 nodes, 20 pods per case) so CI keeps it working; the scale
runs are ``GPU_DRA_SCHEDCOST_NODES=100 GPU_DRA_SCHEDCOST_PODS=200 pytest
tests/e2e/test_bench_schedcost.py --benchmark-enable`` (and 500 nodes, 100 pods); numbers
in docs/benchmarks.md. ``dynamic-mig-by-kind`` is an experiment: the dynamic layout's
devices in another order, posted rather than published (see docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.devcluster.controlplane import ClusterConfig, LocalCluster
from driver.kube.api import api_request
from tests.support.apiserver import RESOURCE_V1, ControlPlane, make_namespace, unique
from tests.support.metrics import metric_values
from tests.support.plugin_bench import rss_kib
from tests.support.schedcost import (
    CLAIMS,
    GIVES,
    LAYOUTS,
    clear,
    dgx_h100,
    fits,
    per_pod,
    posted,
    published,
    ready_nodes,
    schedule,
)

NODES = int(os.environ.get("GPU_DRA_SCHEDCOST_NODES", "10"))
PODS = int(os.environ.get("GPU_DRA_SCHEDCOST_PODS", "20"))


# As scheduler_perf's clients (util.go): the default 50 QPS would measure client-go's rate
# limiter (the scheduler writes each claim's allocation and each binding), not the scheduler.
UNLIMITED = ("--kube-api-qps=5000", "--kube-api-burst=5000")
METRICS = "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"


@pytest.fixture(scope="module")
def control_plane(assets: Path) -> Iterator[ControlPlane]:
    """A cluster of this module's own (no other test's objects in the scheduler's caches),
    its kube-scheduler and kube-controller-manager free of client rate limits."""
    with LocalCluster(ClusterConfig(assets=assets)) as cluster:
        for binary in ("kube-scheduler", "kube-controller-manager"):
            if not (assets / binary).is_file():
                pytest.skip(f"{binary} not in {assets}")
        cluster.start_scheduler((*UNLIMITED, METRICS))
        cluster.start_controller_manager(extra=UNLIMITED)
        api = cluster.api_client()
        try:
            yield ControlPlane(cluster=cluster, kubeconfig=cluster.kubeconfig, api=api)
        finally:
            api.close()


@pytest.fixture(scope="module")
def nodes(control_plane: ControlPlane) -> Iterator[list[str]]:
    with ready_nodes(control_plane.cluster, unique("sched"), NODES) as names:
        yield names


@pytest.fixture(scope="module")
def pools(request: pytest.FixtureRequest, control_plane: ControlPlane, nodes: list[str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every node's pool in one layout; what publishing took and the components' RSS."""
    layout = LAYOUTS[request.param]
    inventory = dgx_h100(layout, tmp_path_factory.mktemp(request.param))
    cluster = control_plane.cluster
    publish = posted if layout.by_kind else published
    with publish(control_plane.api, nodes, inventory, layout) as seconds:
        pids = cluster.pids
        rss = {f"rss_mib_{name}": rss_kib(pids[name]) // 1024
               for name in ("kube-apiserver", "etcd", "kube-scheduler") if name in pids}
        yield {"layout": request.param, "publish_s": round(seconds, 2), **rss}


# each layout with the claims it has devices for (a plain node has no MIG device)
@pytest.mark.parametrize(("pools", "claim"), [(layout, claim) for layout in LAYOUTS
                                              for claim in CLAIMS if fits(layout, claim)],
                         indirect=["pools"])
def test_scheduler_binds_pods_with_claims(
        benchmark: BenchmarkFixture, control_plane: ControlPlane, device_classes: None,
        pools: dict[str, Any], claim: str) -> None:
    api = control_plane.api
    namespace = make_namespace(api, unique("sched"))
    runs = []
    cluster = control_plane.cluster

    def once() -> None:
        runs.append(schedule(api, namespace, claim, PODS, timeout=60 + PODS))

    try:
        before = metric_values(cluster.metrics("kube-scheduler"))
        benchmark.pedantic(once, rounds=1, iterations=1)
        after = metric_values(cluster.metrics("kube-scheduler"))
        run = runs[0]
        benchmark.extra_info.update(
            pools, nodes=NODES, pods=PODS, pods_per_s=round(run.pods_per_second, 1),
            creating_s=round(run.creating, 2), rewatches=run.rewatches,
            p50_ms=round(run.percentile(50) * 1000, 1),
            p99_ms=round(run.percentile(99) * 1000, 1), **per_pod(before, after, PODS))
        # What a user checks: every claim got the kind of device it asked for, as many as
        # it asked for, and no device went to two claims.
        claims = api_request(api, "GET", f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims"
                             ).expect(200)["items"]
        results = [r for c in claims for r in c["status"]["allocation"]["devices"]["results"]]
        want = CLAIMS[claim]["devices"]["requests"][0]["exactly"]["count"]
        assert len(claims) == PODS and len(results) == PODS * want
        assert all(re.fullmatch(GIVES[claim], r["device"]) for r in results), results[:3]
        given = Counter((r["pool"], r["device"]) for r in results)
        assert given.most_common(1)[0][1] == 1, given.most_common(3)
    finally:
        clear(api, namespace)
        api_request(api, "DELETE", f"/api/v1/namespaces/{namespace}").expect(200, 202, 404)

