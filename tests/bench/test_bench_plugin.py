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

import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver._proto.dra_v1 import api_pb2 as dra_v1
from tests.support.plugin import (
    Claim,
    Kubelet,
    Node,
    make_claim,
    result,
    short_tmp,
    wait_for_socket,
)

ROUNDS = 200
CYCLES = 10_000


@dataclass
class Daemon:
    node: Node
    proc: subprocess.Popen[bytes]
    kubelet: Kubelet

    def call(self, method: str, claims: Sequence[Claim]) -> Any:
        request_type = getattr(dra_v1, f"{method}Request")
        request = request_type(claims=[dra_v1.Claim(namespace=c.namespace, name=c.name,
                                                    uid=c.uid) for c in claims])
        response = getattr(self.kubelet.v1, method)(request, timeout=45)
        assert all(not entry.error for entry in response.claims.values()), response
        return response

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmRSS:")))


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with short_tmp() as root:
        node = Node(root)
        with open(root / "plugin.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "driver.cli",
                                     *node.cli_args("dgx-h100")], stdout=log, stderr=log)
        wait_for_socket(node.registration_socket)
        kubelet = Kubelet(node.dra_socket, node.registration_socket)
        kubelet.get_info(timeout=10, wait_for_ready=True)
        yield Daemon(node, proc, kubelet)
        kubelet.close()
        proc.terminate()
        proc.wait(30)


def record_p99(benchmark: BenchmarkFixture) -> None:
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.rounds:
        data = stats.sorted_data
        benchmark.extra_info["p99_ms"] = round(data[int(0.99 * (len(data) - 1))] * 1000, 3)


def measure(benchmark: BenchmarkFixture, timed: Callable[[], Any],
            untimed: Callable[[], Any]) -> None:
    """Time `timed`; `untimed` runs before each round and puts the state back."""

    def setup() -> None:  # pytest-benchmark would take a returned value as arguments
        untimed()

    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=5)
    record_p99(benchmark)


CASES = {
    "1 claim, 1 GPU": lambda local: [make_claim(local, [result("gpu-0")])],
    "1 claim, 8 GPUs": lambda local: [make_claim(local, [result(f"gpu-{i}")
                                                         for i in range(8)])],
    # Only 8 GPUs exist, so 100 claims share them with adminAccess.
    "100 claims, 1 GPU each": lambda local: [make_claim(local, [result(f"gpu-{i % 8}",
                                                                       admin=True)])
                                             for i in range(100)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    claims = CASES[case](daemon.node.local)
    measure(benchmark, lambda: daemon.call("NodePrepareResources", claims),
            lambda: daemon.call("NodeUnprepareResources", claims))
    daemon.call("NodeUnprepareResources", claims)


@pytest.mark.parametrize("case", list(CASES))
def test_unprepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    claims = CASES[case](daemon.node.local)
    measure(benchmark, lambda: daemon.call("NodeUnprepareResources", claims),
            lambda: daemon.call("NodePrepareResources", claims))


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
