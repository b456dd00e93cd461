"""What the driver costs a pod on a real node: pod created to container running, with a
GPU claim and without, the same pods in the same run, and the kubelet's own DRA metrics
for our plugin. Numbers go to pytest-benchmark's extra_info (and docs/benchmarks.md); the
assertions are only that the measurements were made."""

from __future__ import annotations

import statistics
import time

from pytest_benchmark.fixture import BenchmarkFixture

from tests.support.nodepods import DRIVER, Workloads, kubelet_dra_metrics
from tests.support.realnode import RealNode

PODS = 20


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _time_pod(workloads: Workloads, name: str, claim: bool) -> float:
    t0 = time.monotonic()
    if claim:
        workloads.claim(name)
    workloads.pod(name, [name] if claim else [], command="exec sleep 3600")
    workloads.wait_running(name)
    took = time.monotonic() - t0
    workloads.delete_pod(name)
    return took


def test_pod_start_with_and_without_a_claim(benchmark: BenchmarkFixture, workloads: Workloads,
                                            real_node: RealNode) -> None:
    with_claim: list[float] = []
    without: list[float] = []

    def run() -> None:
        for i in range(PODS):  # interleaved, so both see the same machine load
            without.append(_time_pod(workloads, f"plain-{i}", claim=False))
            with_claim.append(_time_pod(workloads, f"gpu-{i}", claim=True))

    benchmark.pedantic(run, rounds=1, iterations=1)
    metrics = kubelet_dra_metrics(real_node.kubelet_metrics(), DRIVER)
    stats = {
        "pods": PODS,
        "with_claim_p50_s": statistics.median(with_claim),
        "with_claim_p99_s": _percentile(with_claim, 0.99),
        "without_p50_s": statistics.median(without),
        "without_p99_s": _percentile(without, 0.99),
        "kubelet_to_ready_s": real_node.timings.kubelet_to_ready,
        "control_plane_s": real_node.timings.control_plane,
        "containerd_s": real_node.timings.containerd,
        "images_imported_s": real_node.timings.images,
        "kubelet_dra_metrics": {k: {"count": c, "sum_s": s} for k, (c, s) in metrics.items()},
    }
    benchmark.extra_info.update(stats)
    print(stats)
    assert len(with_claim) == len(without) == PODS
    assert any(k.startswith("dra_grpc_operations_duration_seconds") and c >= PODS
               for k, (c, _) in metrics.items()), f"no kubelet DRA gRPC metrics: {metrics}"
    assert any(k.startswith("dra_operations_duration_seconds") for k in metrics), metrics
