"""Kubelet plugin cost, measured as the kubelet sees it: NodePrepareResources and
NodeUnprepareResources over the unix socket of a real `gpu-dra plugin --mock dgx-h100`
process with claims from its local directory, also with 100, 1,000 and 5,000 claims already
prepared (a call's cost must not grow with them), and the process's memory before and after
10,000 prepare/unprepare cycles.

Run with `pytest tests/bench/test_bench_plugin.py --benchmark-enable`; the numbers go to
docs/benchmarks.md (p50 is the median; p99 is in each benchmark's extra_info). Under the
default test run each benchmark runs once, the memory bench runs 100 cycles and the plugin
holds at most 100 claims, as smoke tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.support.plugin import NODE, make_claim, result
from tests.support.plugin_bench import (
    Daemon,
    bench_prepare,
    bench_unprepare,
    dgx_h100_process,
    shapes,
)

CYCLES = 10_000
CASES = shapes(NODE)
HELD = (0, 100, 1000, 5000)
FILL_BATCH = 500  # claims per call when filling


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with dgx_h100_process() as running:
        yield running


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    bench_prepare(benchmark, daemon, [make_claim(daemon.node.local, results)
                                      for results in CASES[case]])


@pytest.mark.parametrize("case", list(CASES))
def test_unprepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    bench_unprepare(benchmark, daemon, [make_claim(daemon.node.local, results)
                                        for results in CASES[case]])


@pytest.fixture(scope="module", params=HELD, ids=lambda n: f"{n} held")
def holding(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A plugin process holding `request.param` prepared claims (1 GPU each, adminAccess:
    there are 8 GPUs), prepared through it in calls of FILL_BATCH."""
    config = request.config
    smoke = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
    count = min(request.param, 100) if smoke else request.param
    with dgx_h100_process() as running:
        held = [make_claim(running.node.local, [result(f"gpu-{i % 8}", admin=True)])
                for i in range(count)]
        for i in range(0, len(held), FILL_BATCH):
            running.call("NodePrepareResources", held[i:i + FILL_BATCH])
        yield running


def test_prepare_latency_with_held_claims(benchmark: BenchmarkFixture, holding: Daemon) -> None:
    bench_prepare(benchmark, holding, [make_claim(holding.node.local, [result("gpu-0")])])


def test_unprepare_latency_with_held_claims(benchmark: BenchmarkFixture, holding: Daemon
                                            ) -> None:
    bench_unprepare(benchmark, holding, [make_claim(holding.node.local, [result("gpu-0")])])


def test_memory_after_prepare_unprepare_cycles(benchmark: BenchmarkFixture,
                                               daemon: Daemon) -> None:
    """RSS idle and after CYCLES prepare/unprepare cycles of claims with new UIDs each time
    (as pods come and go). Recorded, not asserted."""
    cycles = 100 if benchmark.disabled else CYCLES
    for _ in range(20):  # warm up: thread pools, first-call caches
        claim = make_claim(daemon.node.local, [result("gpu-0")])
        daemon.call("NodePrepareResources", [claim])
        daemon.call("NodeUnprepareResources", [claim])
    idle = daemon.rss_kib()

    def run() -> None:
        for i in range(cycles):
            claim = make_claim(daemon.node.local, [result(f"gpu-{i % 8}")])
            daemon.call("NodePrepareResources", [claim])
            daemon.call("NodeUnprepareResources", [claim])

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(cycles=cycles, rss_idle_kib=idle,
                                rss_after_kib=daemon.rss_kib())
