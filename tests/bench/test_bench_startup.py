"""Start-up of `gpu-dra plugin --mock dgx-h100 --mig-mode dynamic` with its local
directory, as a whole process: from exec until the kubelet would see it registered (its
registration socket answers GetInfo and its DRA socket answers a call). The first start
on an empty node, and a restart that finds the slices, the checkpoint and the CDI root of
the run before.

Run with `pytest tests/bench/test_bench_startup.py --benchmark-enable` (10 starts each);
the numbers go to docs/benchmarks.md (p50 is the median; p99, of 10 the slowest, is in
extra_info, with `cpu_ms`, the median CPU time of a start). Under the default test run each
case starts once, as a smoke test. The API server's cases are in
tests/e2e/test_bench_startup_api.py.

Side by side with another checkout (a commit before a change), alternating so that the
shared machine's load falls on both alike:
`GPU_DRA_STARTUP_BASELINE=/path/to/checkout pytest tests/bench/test_bench_startup.py -s
-k baseline` prints p50, p99, min and the CPU p50 of 10 starts of each.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.support.plugin import Node, short_tmp
from tests.support.plugin_bench import (
    STARTUP_BASELINE,
    THIS_CHECKOUT,
    Start,
    bench_startup,
    compare_starts,
)


@pytest.mark.parametrize("case", ["first start", "restart"])
def test_startup(benchmark: BenchmarkFixture, case: str) -> None:
    with short_tmp() as root:
        numbers = itertools.count() if case == "first start" else itertools.repeat(0)

        def next_start() -> Start:
            node = Node(root / f"n{next(numbers)}")
            node.root.mkdir(exist_ok=True)
            return node, node.cli_args("dgx-h100", "--mig-mode", "dynamic")

        bench_startup(benchmark, next_start)


@pytest.mark.skipif(not STARTUP_BASELINE, reason="GPU_DRA_STARTUP_BASELINE: a checkout")
@pytest.mark.parametrize("case", ["first start", "restart"])
def test_startup_against_baseline(case: str) -> None:
    assert STARTUP_BASELINE is not None
    with short_tmp() as root:
        numbers = itertools.count()

        def next_start(name: str) -> Start:
            node = Node(root / f"{name}-{next(numbers) if case == 'first start' else 0}")
            node.root.mkdir(exist_ok=True)
            return node, node.cli_args("dgx-h100", "--mig-mode", "dynamic")

        times = compare_starts({"baseline": Path(STARTUP_BASELINE), "this": THIS_CHECKOUT},
                               next_start)
    print(f"\nlocal directory, {case}, load {os.getloadavg()}: "
          f"{json.dumps({name: t.summary() for name, t in times.items()})}")
