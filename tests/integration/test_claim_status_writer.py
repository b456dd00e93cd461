"""The writer of claims' status.devices against an API that fails, hangs or refuses: the
prepare path never waits for it, failed writes are retried with backoff and counted,
refusals for good are not retried, only each claim's latest state is written, and a
health change writes only the claims whose entries changed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from driver.kube.api import ApiError, ApiResult
from driver.plugin import claimstatus
from driver.plugin.checkpoint import PreparedDevice
from driver.plugin.claims import ClaimRef
from driver.plugin.claimstatus import StatusWriter
from driver.plugin.metrics import Metrics
from tests.support.apiserver import wait_for
from tests.support.plugin import NODE, new_uid

DEVICE = PreparedDevice(request_names=("gpu",), pool=NODE, device="gpu-0",
                        cdi_device_ids=("x",), gpu_uuid="GPU-0")


@dataclass
class FakeApi:
    """Records each write; answers from `failures` first (an exception to raise), then
    succeeds; `gate`, when cleared, holds every write (an API server that hangs)."""

    failures: list[Exception] = field(default_factory=list)
    writes: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)  # a write began

    def __post_init__(self) -> None:
        self.gate.set()

    def write(self, ref: ClaimRef, body: dict[str, Any]) -> None:
        self.entered.set()
        self.gate.wait()
        assert body["metadata"] == {"name": ref.name, "namespace": ref.namespace,
                                    "uid": ref.uid}
        self.writes.append((ref.uid, body["status"]["devices"]))
        if self.failures:
            raise self.failures.pop(0)


def refusal(status: int) -> ApiError:
    return ApiError(ApiResult("PATCH", "/x", status, {"message": "no"}), (200,))


@dataclass
class Health:
    """What the entries say of a device: its health, changed by the test."""

    word: str = "healthy"

    def entries(self, ref: ClaimRef, devices: tuple[PreparedDevice, ...],
                prepared_at: datetime) -> list[dict[str, Any]]:
        return [{"driver": "d", "pool": d.pool, "device": d.device, "data": {"h": self.word}}
                for d in devices]


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def writer(api: FakeApi, health: Health, metrics: Metrics,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusWriter]:
    monkeypatch.setattr(claimstatus, "RETRY_FIRST", 0.05)
    monkeypatch.setattr(claimstatus, "REFRESH_INTERVAL", 0.05)
    monkeypatch.setattr(claimstatus, "SETTLE", 0.05)
    made = StatusWriter(api.write, health.entries, metrics, lambda: datetime.now(UTC))
    made.start()
    yield made
    api.gate.set()
    made.stop()


def ref() -> ClaimRef:
    return ClaimRef("team-a", f"claim-{new_uid()[:8]}", new_uid())


def count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("gpu_dra_claim_status_writes_total",
                                              {"result": result})
    return value or 0.0


def entry(word: str = "healthy") -> list[dict[str, Any]]:
    return [{"driver": "d", "pool": NODE, "device": "gpu-0", "data": {"h": word}}]


def test_a_hung_api_server_does_not_hold_prepare_back(api: FakeApi, writer: StatusWriter
                                                      ) -> None:
    api.gate.clear()
    first, second = ref(), ref()
    writer.prepared(first, (DEVICE,))
    assert api.entered.wait(5)
    # the API server holds the first write: these return all the same (the bench says
    # how fast)
    writer.prepared(second, (DEVICE,))
    writer.unprepared(first)
    assert not writer.idle()
    api.gate.set()
    wait_for(writer.idle, "the writes done")
    assert api.writes[0] == (first.uid, entry())
    assert sorted(api.writes[1:], key=lambda w: w[0] == first.uid) == \
        [(second.uid, entry()), (first.uid, [])]


def test_failed_writes_are_retried_and_counted(api: FakeApi, writer: StatusWriter,
                                               metrics: Metrics) -> None:
    api.failures = [ConnectionRefusedError("refused"), refusal(503)]
    claim = ref()
    writer.prepared(claim, (DEVICE,))
    wait_for(lambda: count(metrics, "success") == 1, "the third try to succeed")
    assert [uid for uid, _ in api.writes] == [claim.uid] * 3
    assert (count(metrics, "error"), count(metrics, "refused")) == (2, 0)
    assert writer.idle()


@pytest.mark.parametrize("status", [403, 404, 409, 422])
def test_a_refusal_for_good_is_not_retried(api: FakeApi, writer: StatusWriter,
                                           metrics: Metrics, status: int) -> None:
    api.failures = [refusal(status)]
    writer.prepared(ref(), (DEVICE,))
    wait_for(lambda: count(metrics, "refused") == 1, "the refusal")
    time.sleep(0.3)  # several backoff periods: nothing more is tried
    assert len(api.writes) == 1 and writer.idle()


def test_removing_the_entries_of_a_deleted_claim_is_no_failure(
        api: FakeApi, writer: StatusWriter, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    """A claim made from a template is deleted with its pod, before the kubelet's
    unprepare: its entries are gone with it, which is what the removal wanted."""
    claim = ref()
    writer.prepared(claim, (DEVICE,))
    wait_for(lambda: len(api.writes) == 1, "the entries written")
    api.failures = [refusal(404)]
    writer.unprepared(claim)
    wait_for(lambda: len(api.writes) == 2 and writer.idle(), "the removal tried")
    assert (count(metrics, "success"), count(metrics, "refused")) == (2, 0)
    assert "cannot write status.devices" not in caplog.text


def test_only_the_latest_state_of_a_claim_is_written(api: FakeApi, writer: StatusWriter
                                                     ) -> None:
    api.gate.clear()
    busy, claim = ref(), ref()
    writer.prepared(busy, (DEVICE,))
    assert api.entered.wait(5)
    writer.prepared(claim, (DEVICE,))
    writer.prepared(claim, (DEVICE, DEVICE))
    restored = ref()  # prepared by the process before: its entries may be there
    writer.prepared(restored, (DEVICE,), restored=True)
    writer.unprepared(restored)
    api.gate.set()
    wait_for(writer.idle, "the writes done")
    assert [(uid, len(devices)) for uid, devices in api.writes[1:]] == \
        [(claim.uid, 2), (restored.uid, 0)]


def test_a_claim_unprepared_before_its_write_costs_none(api: FakeApi, writer: StatusWriter
                                                        ) -> None:
    claim = ref()
    writer.prepared(claim, (DEVICE,))
    writer.unprepared(claim)
    time.sleep(0.2)
    assert api.writes == [] and writer.idle()


def test_a_health_change_writes_the_claims_it_changes(api: FakeApi, writer: StatusWriter,
                                                      health: Health) -> None:
    claim = ref()
    writer.prepared(claim, (DEVICE,))
    wait_for(lambda: len(api.writes) == 1, "the first write")
    writer.refresh()  # nothing changed: nothing written
    time.sleep(0.2)
    assert len(api.writes) == 1
    health.word = "xid"
    writer.refresh()
    wait_for(lambda: len(api.writes) == 2, "the new health written")
    assert api.writes[-1][1][0]["data"] == {"h": "xid"}


def test_an_unknown_claim_with_a_bad_reference_is_not_written(api: FakeApi,
                                                              writer: StatusWriter) -> None:
    writer.unprepared(ClaimRef("../etc", "x", new_uid()))
    time.sleep(0.1)
    assert api.writes == [] and writer.idle()
