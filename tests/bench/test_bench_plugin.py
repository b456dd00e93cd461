"""Kubelet plugin cost, measured as the kubelet sees it: NodePrepareResources and
NodeUnprepareResources over the unix socket of a real `gpu-dra plugin --mock dgx-h100`
process with claims from its local directory, and the process's memory before and after
10,000 prepare/unprepare cycles.

Run with `pytest tests/bench/test_bench_plugin.py --benchmark-enable`; the numbers go to
docs/benchmarks.md (p50 is the median; p99 is in each benchmark's extra_info). Under the
default test run each benchmark runs once and the memory bench runs 100 cycles, as smoke
tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.support.plugin import NODE, Node, make_claim, result, short_tmp
from tests.support.plugin_bench import (
    Daemon,
    bench_prepare,
    bench_unprepare,
    daemon_process,
    shapes,
)

CYCLES = 10_000
CASES = shapes(NODE)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with short_tmp() as root:
        node = Node(root)
        with daemon_process(node, node.cli_args("dgx-h100")) as running:
            yield running


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    bench_prepare(benchmark, daemon, [make_claim(daemon.node.local, results)
                                      for results in CASES[case]])


@pytest.mark.parametrize("case", list(CASES))
def test_unprepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    bench_unprepare(benchmark, daemon, [make_claim(daemon.node.local, results)
                                        for results in CASES[case]])


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
