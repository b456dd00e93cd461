"""GPU health as the cluster sees it: XID 79 recorded in the mock's state file (as `gpu-dra
mock inject` records it) to the node's ResourceSlices in the real kube-apiserver carrying
the taint on gpu-3, for a `gpu-dra plugin --mock dgx-h100 --mig-mode dynamic --kubeconfig`
process, over CYCLES inject/recover cycles. Each cycle starts after a quiet second (no
write waits for the coalescing interval); the API server is polled every 20 ms (a LIST of
the node's slices), so each time includes up to one poll.

Run with `pytest tests/e2e/test_bench_health_api.py --benchmark-enable`; p50/p99 go to
the benchmark's extra_info and docs/benchmarks.md. Under the default test run, 3 cycles,
as a smoke test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.devcluster.controlplane import ComponentError
from driver.kube.api import api_request
from driver.nvml.faults import Fault
from driver.nvml.mock import inject
from tests.support.apiserver import SLICES, ControlPlane, wait_for
from tests.support.health import SICK, HealthNode, p50_p99
from tests.support.plugin import short_tmp

CYCLES = 50
TAINT_BOUND_S = 10.0  # the target is 1 s; generous for a loaded machine
QUIET_S = 1.1  # the coalescing interval (1 s) and a little


@pytest.fixture
def health_node(control_plane: ControlPlane, fake_node: Callable[..., str]
                ) -> Iterator[HealthNode]:
    """The node with its slices published; the liveness check every 0.2 s, so a recovery
    is quick (it does not touch the event path being measured)."""
    with short_tmp() as root:
        node = HealthNode(control_plane, fake_node(), root, None,
                          "--health-check-interval", "0.2")
        try:
            wait_for(node.devices, f"{node.name}'s ResourceSlices", fatal=(ComponentError,))
            yield node
        finally:
            node.plugin.stop()
            api_request(control_plane.api, "DELETE", SLICES, query={
                "fieldSelector": f"spec.nodeName={node.name}"}).expect(200, 404)


def test_event_to_slice_in_the_api_server(benchmark: BenchmarkFixture,
                                          health_node: HealthNode) -> None:
    node = health_node
    sick = f"gpu-{SICK}"
    cycles = 3 if benchmark.disabled else CYCLES
    took: list[float] = []

    def run() -> None:
        for _ in range(cycles):
            time.sleep(QUIET_S)
            inject(node.state, SICK, Fault("xid", 79))
            took.append(node.timed(lambda: sick in (node.taints() or {}),
                                   "gpu-3's taint in the API server", TAINT_BOUND_S))
            inject(node.state, SICK, Fault("recover"))
            node.timed(lambda: node.taints() == {}, "gpu-3's taints to go", TAINT_BOUND_S)

    benchmark.pedantic(run, rounds=1, iterations=1)
    stats = {"cycles": cycles, "api_server": p50_p99(took)}
    benchmark.extra_info.update(stats)
    print(stats)
    assert len(took) == cycles
