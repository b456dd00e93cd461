"""Re-discovery cost on dgx-h100 (dynamic MIG, local mode, a plugin in this process): a
pass that finds nothing new (NVML read again and compared: the periodic cost), and a pass
that finds GPU 3 gone or back (and swaps what is published: the device index, the slices,
the mock driver root's device nodes and driver files, the monitor's GPUs; the slice write
itself follows in the republisher's thread and is not in the number).

Run with `pytest tests/bench/test_bench_rediscover.py --benchmark-enable`; the numbers go
to docs/benchmarks.md. Under the default test run each benchmark runs once as a smoke test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.nvml.faults import Fault
from driver.nvml.mock import inject
from tests.support.plugin import Node, plugins, short_tmp


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[Any, Path]]:
    """The plugin (no timer: passes run only when the benchmark asks) and its mock state."""
    with short_tmp() as root, plugins(Node(root)) as start:
        state = root / "mock-state.json"
        yield start(mock_state=state, mig_mode="dynamic", rediscover_interval=0).plugin, state


def test_rediscover_pass_nothing_new(benchmark: BenchmarkFixture,
                                     running: tuple[Any, Path]) -> None:
    plugin, _ = running
    assert benchmark(plugin.rediscover) == []


def test_rediscover_pass_gpu_gone_or_back(benchmark: BenchmarkFixture,
                                          running: tuple[Any, Path]) -> None:
    plugin, state = running
    present = [True]

    def flip() -> tuple[tuple[()], dict[str, Any]]:
        """GPU 3 leaves NVML's enumeration, or comes back: the next pass finds it."""
        inject(state, 3, Fault("remove" if present[0] else "add"))
        present[0] = not present[0]
        return (), {}

    found = benchmark.pedantic(plugin.rediscover, setup=flip, rounds=20, iterations=1)
    assert found and found[0].startswith("GPU 3 ")
