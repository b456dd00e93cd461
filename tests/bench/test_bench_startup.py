"""Start-up of `gpu-dra plugin --mock dgx-h100 --mig-mode dynamic` with its local
directory, as a whole process: from exec until the kubelet would see it registered (its
registration socket answers GetInfo and its DRA socket answers a call). The first start
on an empty node, and a restart that finds the slices, the checkpoint and the CDI root of
the run before.

Run with `pytest tests/bench/test_bench_startup.py --benchmark-enable` (10 starts each);
the numbers go to docs/benchmarks.md (p50 is the median; p99, of 10 the slowest, is in
extra_info). Under the default test run each case starts once, as a smoke test. The API
server's cases are in tests/e2e/test_bench_startup_api.py.
"""

from __future__ import annotations

import itertools

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.support.plugin import Node, short_tmp
from tests.support.plugin_bench import Start, bench_startup


@pytest.mark.parametrize("case", ["first start", "restart"])
def test_startup(benchmark: BenchmarkFixture, case: str) -> None:
    with short_tmp() as root:
        numbers = itertools.count() if case == "first start" else itertools.repeat(0)

        def next_start() -> Start:
            node = Node(root / f"n{next(numbers)}")
            node.root.mkdir(exist_ok=True)
            return node, node.cli_args("dgx-h100", "--mig-mode", "dynamic")

        bench_startup(benchmark, next_start)
