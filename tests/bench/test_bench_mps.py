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
from tests.support.plugin_bench import (
    Daemon,
    bench_prepare,
    bench_unprepare,
    dgx_h100_process,
    rss_kib,
)

MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 25,
                                            "defaultPinnedDeviceMemoryLimit": "20Gi"})
CASES = {"1 claim, 1 GPU": [[result("gpu-0", pool=NODE)]],
         "1 claim, 8 GPUs": [[result(f"gpu-{i}", pool=NODE) for i in range(8)]],
         "8 claims, 1 GPU each": [[result(f"gpu-{i}", pool=NODE)] for i in range(8)]}
ROUNDS = 50  # each starts or stops a daemon per claim: a Python process of the stand-in


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with dgx_h100_process() as running:
        yield running


def claims(daemon: Daemon, case: str) -> list[Claim]:
    return [make_claim(daemon.node.local, results, [opaque(MPS)]) for results in CASES[case]]


def daemon_rss_kib(node: Node, claim: Claim) -> int:
    return rss_kib(int((node.plugin_dir / "mps" / claim.uid / "pipe" / PID_FILE).read_text()))


@pytest.mark.parametrize("case", list(CASES))
def test_mps_prepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    batch = claims(daemon, case)
    daemon.call("NodePrepareResources", batch)
    benchmark.extra_info["standin_daemon_rss_kib"] = daemon_rss_kib(daemon.node, batch[0])
    daemon.call("NodeUnprepareResources", batch)
    bench_prepare(benchmark, daemon, batch, ROUNDS, warmup_rounds=2)
    assert list((daemon.node.plugin_dir / "mps").iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_mps_unprepare_latency(benchmark: BenchmarkFixture, daemon: Daemon, case: str) -> None:
    bench_unprepare(benchmark, daemon, claims(daemon, case), ROUNDS, warmup_rounds=2)
    assert list((daemon.node.plugin_dir / "mps").iterdir()) == []
