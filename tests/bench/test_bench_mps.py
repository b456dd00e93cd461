"""MPS per claim, as the kubelet sees it: NodePrepareResources (compute mode set, the
claim's daemon started and told its limits, the CDI spec written) and
NodeUnprepareResources (`quit`, the daemon waited for, compute mode put back, the
directory removed) of a real `gpu-dra plugin --mock dgx-h100` process, whose mock driver
root's nvidia-cuda-mps-control is the Python stand-in (`driver.nvml.mpsstandin`): its
start-up is most of the cost, so a real daemon's numbers differ; the stand-in daemon's
memory is recorded in extra_info for the same reason, as the stand-in's, not MPS's.

Run with `pytest tests/bench/test_bench_mps.py --benchmark-enable`; the numbers go to
docs/benchmarks.md (p50 is the median; p99 is in each benchmark's extra_info).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.nvml.mpsstandin import PID_FILE
from tests.support.plugin import (
    NODE,
    Claim,
    Node,
    gpu_config,
    make_claim,
    opaque,
    result,
)
from tests.support.plugin_bench import Daemon, dgx_h100_process, record_p99

MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 25,
                                            "defaultPinnedDeviceMemoryLimit": "20Gi"})
CASES = {"1 claim, 1 GPU": [[result("gpu-0", pool=NODE)]],
         "1 claim, 8 GPUs": [[result(f"gpu-{i}", pool=NODE) for i in range(8)]],
         "8 claims, 1 GPU each": [[result(f"gpu-{i}", pool=NODE)] for i in range(8)]}
ROUNDS = 50  # each starts or stops a daemon per claim: a Python process of the stand-in


def measure(benchmark: BenchmarkFixture, daemon: Daemon, timed: str, batch: list[Claim]
            ) -> None:
    """Time the kubelet call `timed` on `batch`; the other one runs before each round."""
    untimed = "NodeUnprepareResources" if timed == "NodePrepareResources" else \
        "NodePrepareResources"

    def setup() -> None:
        daemon.call(untimed, batch)

    benchmark.pedantic(lambda: daemon.call(timed, batch), setup=setup, rounds=ROUNDS,
                       iterations=1, warmup_rounds=2)
    record_p99(benchmark)
    if timed == "NodePrepareResources":
        daemon.call("NodeUnprepareResources", batch)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with dgx_h100_process() as running:
        yield running


def claims(daemon: Daemon, case: str) -> list[Claim]:
    return [make_claim(daemon.node.local, results, [opaque(MPS)]) for results in CASES[case]]


def daemon_rss_kib(node: Node, claim: Claim) -> int:
    pid = (node.plugin_dir / "mps" / claim.uid / "pipe" / PID_FILE).read_text().strip()
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:")))


@pytest.mark.parametrize("case", list(CASES))
def test_mps_prepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    batch = claims(daemon, case)
    daemon.call("NodePrepareResources", batch)
    benchmark.extra_info["standin_daemon_rss_kib"] = daemon_rss_kib(daemon.node, batch[0])
    daemon.call("NodeUnprepareResources", batch)
    measure(benchmark, daemon, "NodePrepareResources", batch)
    assert list((daemon.node.plugin_dir / "mps").iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_mps_unprepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    measure(benchmark, daemon, "NodeUnprepareResources", claims(daemon, case))
    assert list((daemon.node.plugin_dir / "mps").iterdir()) == []
