"""ResourceSlice cost: building the dgx-h100 pool in dynamic MIG mode (pure), and
publishing it to a real kube-apiserver: a full publish from nothing, and the no-change
resync every restart and every resync period pays.

Run with `pytest tests/bench/test_bench_publish.py --benchmark-enable`; the numbers go to
docs/benchmarks.md. The API server benchmarks start their own control plane (etcd and
kube-apiserver, found like the e2e tier finds them) and are skipped without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.devcluster.controlplane import (
    CORE_BINARIES,
    ClusterConfig,
    FakeNodeKeeper,
    LocalCluster,
    find_assets,
)
from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices
from driver.resourceslice.publish import ApiPublisher, SlicePool

DRIVER = "gpu.dra.dev"
NODE = "bench-node"


@pytest.fixture(scope="module")
def inventory() -> Inventory:
    return discover(mock_provider("dgx-h100"))


@pytest.fixture(scope="module")
def publisher() -> Iterator[ApiPublisher]:
    """A publisher for a Node of a fresh control plane."""
    assets = find_assets(CORE_BINARIES)
    if assets is None:
        pytest.skip("no control-plane binaries: see tests/e2e/conftest.py")
    with LocalCluster(ClusterConfig(assets=assets)) as cluster:
        api = cluster.api_client()
        with FakeNodeKeeper(api) as keeper:
            keeper.add(NODE)
            yield ApiPublisher(api, SlicePool(DRIVER, NODE, "dynamic"))
        api.close()


def test_build_slices_dgx_h100_dynamic(benchmark: BenchmarkFixture,
                                       inventory: Inventory) -> None:
    options = SliceOptions(DRIVER, NODE, "dynamic", "split")
    slices = benchmark(build_slices, inventory, options, 1)
    # Per GPU: the whole GPU and its 25 MIG profile placements.
    assert sum(len(s["spec"].get("devices", [])) for s in slices) == 8 * 26


def test_full_publish_dgx_h100_dynamic(benchmark: BenchmarkFixture, inventory: Inventory,
                                       publisher: ApiPublisher) -> None:
    def empty_pool() -> tuple[tuple[Any, ...], dict[str, Any]]:
        publisher.cleanup()
        return (inventory,), {}

    result = benchmark.pedantic(publisher.publish, setup=empty_pool, rounds=20,
                                warmup_rounds=1)
    assert len(result.created) == 5


def test_no_change_resync_dgx_h100_dynamic(benchmark: BenchmarkFixture, inventory: Inventory,
                                           publisher: ApiPublisher) -> None:
    publisher.publish(inventory)
    result = benchmark(publisher.publish, inventory)
    assert result.writes == 0
