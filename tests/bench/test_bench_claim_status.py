"""What claim device status costs the prepare path: noting a prepared claim for the
writer while the API server hangs (the write itself runs on the writer's thread), and
building a claim's entries on that thread (8 GPUs, every kind of trouble on one).

    .venv/bin/pytest tests/bench/test_bench_claim_status.py --benchmark-enable
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.health.model import Condition, GpuHealth
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.plugin.checkpoint import PreparedDevice
from driver.plugin.claims import ClaimRef
from driver.plugin.claimstatus import StatusWriter, claim_entries
from driver.plugin.devices import device_index
from driver.plugin.metrics import Metrics
from driver.plugin.monitor import HealthView
from tests.support.plugin import DRIVER, NODE, new_uid

AT = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
INVENTORY = discover(mock_provider("dgx-h100"))
INDEX = device_index(INVENTORY, "static")
DEVICES = tuple(PreparedDevice(request_names=("gpu",), pool=NODE, device=name,
                               cdi_device_ids=("x",), gpu_uuid=target.gpu.uuid)
                for name, target in INDEX.items())


@pytest.fixture
def hung() -> Iterator[StatusWriter]:
    """A writer whose API server never answers."""
    gate = threading.Event()

    def write(ref: ClaimRef, body: dict[str, Any]) -> None:
        gate.wait()

    writer = StatusWriter(write, lambda ref, devices, at: [], Metrics(),
                          lambda: datetime.now(UTC))
    writer.start()
    yield writer
    gate.set()
    writer.stop()


def test_noting_a_prepared_claim_while_the_api_hangs(benchmark: BenchmarkFixture,
                                                     hung: StatusWriter) -> None:
    refs = iter([ClaimRef("ns", f"c{i}", new_uid()) for i in range(200_000)])
    benchmark(lambda: hung.prepared(next(refs), DEVICES[:1]))


def test_building_the_entries_of_an_8_gpu_claim(benchmark: BenchmarkFixture) -> None:
    c = (Condition("xid", "NoExecute", AT, AT, "79", xid=79),
         Condition("ecc", "NoExecute", AT, AT, "double-bit"),
         Condition("unmonitored", "None", AT, AT))
    view = HealthView(gpus={0: GpuHealth(0, c)}, causes={}, uuids={})
    entries = benchmark(lambda: claim_entries(DRIVER, INDEX, INVENTORY.driver_version, view,
                                              DEVICES, AT))
    assert len(entries) == 8
