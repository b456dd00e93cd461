"""Discovery cost: one pass per mock profile, and the whole CLI process.

Run with `pytest tests/bench --benchmark-enable`; the numbers go to
docs/benchmarks.md. Under the default test run each benchmark runs once as a
smoke test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.inventory.discovery import discover
from driver.nvml.mock import list_profiles, mock_provider


@pytest.mark.parametrize("profile", list_profiles())
def test_discovery_pass(benchmark: BenchmarkFixture, profile: str) -> None:
    provider = mock_provider(profile)
    inventory = benchmark(discover, provider)
    assert inventory.gpus


def test_discover_cli_process_dgx_h100_json(benchmark: BenchmarkFixture) -> None:
    command = [sys.executable, "-m", "driver.cli", "discover", "--mock", "dgx-h100",
               "--output", "json"]
    result = benchmark.pedantic(subprocess.run, args=(command,),
                                kwargs={"capture_output": True, "check": True},
                                rounds=10, iterations=1, warmup_rounds=1)
    assert b'"gpus"' in result.stdout
