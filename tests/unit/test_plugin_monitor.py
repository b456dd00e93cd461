"""The health monitor over a fake NVML watch: events and checks become transitions, logged,
counted and handed to `on_change`; an unmonitored GPU is never reported healthy; a watch
that fails is retried; and the republisher writes at most once per interval, retrying a
failed write."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest

from driver.health.classify import HealthSettings
from driver.health.model import GpuHealth
from driver.nvml.events import (
    EventKind,
    GpuLiveness,
    Liveness,
    NvmlEvent,
    RecoveryAction,
    Registration,
)
from driver.plugin import monitor as monitor_module
from driver.plugin.metrics import Metrics
from driver.plugin.monitor import HealthMonitor, HealthView, Republisher, Watch
from driver.resourceslice.plan import Backoff

UUIDS = {0: "GPU-0", 3: "GPU-3"}
SETTLE = 5.0  # generous bound for a thread to act


class FakeWatch:
    """NVML as the monitor sees it: events queued by the test, liveness and the recovery
    action per GPU, and GPUs whose events are not supported."""

    def __init__(self, unsupported: frozenset[str] = frozenset()) -> None:
        self.events: list[NvmlEvent] = []
        self.liveness_of: dict[str, Liveness] = {}
        self.action_of: dict[str, RecoveryAction] = {}
        self.unsupported = unsupported
        self.lock = threading.Lock()

    def register(self, uuid: str) -> Registration:
        minor = next(m for m, u in UUIDS.items() if u == uuid)
        if uuid in self.unsupported:
            return Registration(minor, uuid, frozenset(), "events not supported: test")
        return Registration(minor, uuid, frozenset({EventKind.XID}))

    def wait(self, timeout_s: float) -> list[NvmlEvent]:
        with self.lock:
            events, self.events = self.events, []
        if not events:
            time.sleep(min(timeout_s, 0.01))
        return events

    def liveness(self, uuid: str) -> GpuLiveness:
        return GpuLiveness(uuid, self.liveness_of.get(uuid, Liveness.OK))

    def recovery_action(self, uuid: str) -> RecoveryAction | None:
        return self.action_of.get(uuid)

    def inject(self, event: NvmlEvent) -> None:
        with self.lock:
            self.events.append(event)


class Reports:
    """What `on_change` was given, and a way to wait for a condition on the latest."""

    def __init__(self) -> None:
        self.views: list[HealthView] = []
        self.cond = threading.Condition()

    def __call__(self, view: HealthView) -> None:
        with self.cond:
            self.views.append(view)
            self.cond.notify_all()

    def wait_for(self, ok: Callable[[HealthView], bool]) -> HealthView:
        with self.cond:
            assert self.cond.wait_for(lambda: bool(self.views) and ok(self.views[-1]),
                                      SETTLE), self.views[-1:] or "no report"
            return self.views[-1]


def opener(*watches: Any) -> Callable[[], AbstractContextManager[Watch]]:
    """Opens the given watches in turn; an exception instance is raised instead."""
    queue = list(watches)

    @contextmanager
    def open_watch() -> Iterator[Watch]:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        yield item

    return open_watch


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def run(watch_opener: Callable[[], AbstractContextManager[Watch]], metrics: Metrics,
        reports: Reports, settings: HealthSettings | None = None) -> HealthMonitor:
    monitor = HealthMonitor(watch_opener, UUIDS, settings or HealthSettings(), metrics,
                            reports, check_interval=0.05)
    monitor.start()
    return monitor


def test_a_fatal_xid_makes_the_gpu_unhealthy_and_a_reset_gives_it_back(
        metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    watch, reports = FakeWatch(), Reports()
    monitor = run(opener(watch), metrics, reports)
    try:
        caplog.set_level(logging.INFO, logger="driver.plugin.monitor")
        watch.action_of["GPU-3"] = RecoveryAction.GPU_RESET
        watch.inject(NvmlEvent(3, "GPU-3", EventKind.XID, xid=79))
        view = reports.wait_for(lambda v: v.gpus[3].status == "unhealthy")
        assert view.gpus[0].status == "healthy"
        assert "XID 79" in view.causes[3]
        assert sample(metrics, "gpu_dra_gpu_health", gpu="3", uuid="GPU-3") == 0
        assert sample(metrics, "gpu_dra_gpu_health", gpu="0", uuid="GPU-0") == 1
        assert sample(metrics, "gpu_dra_xid_events_total", gpu="3", xid="79") == 1
        assert sample(metrics, "gpu_dra_health_transitions_total", gpu="3", kind="xid",
                      change="set") == 1
        assert "GPU 3 (GPU-3): xid set (XID 79: GPU has fallen off the bus)" in caplog.text

        del watch.action_of["GPU-3"]  # reset done: it answers with nothing to do
        view = reports.wait_for(lambda v: v.gpus[3].status == "healthy")
        assert sample(metrics, "gpu_dra_gpu_health", gpu="3", uuid="GPU-3") == 1
        assert sample(metrics, "gpu_dra_health_transitions_total", gpu="3", kind="xid",
                      change="cleared") == 1
    finally:
        monitor.stop()


def test_an_informational_xid_changes_no_status(metrics: Metrics) -> None:
    watch, reports = FakeWatch(), Reports()
    monitor = run(opener(watch), metrics, reports)
    try:
        watch.inject(NvmlEvent(0, "GPU-0", EventKind.XID, xid=13))
        view = reports.wait_for(lambda v: bool(v.gpus[0].conditions))
        assert view.gpus[0].status == "healthy"
        assert [(c.kind, c.effect) for c in view.gpus[0].conditions] == [("xid", "None")]
    finally:
        monitor.stop()


def test_a_lost_gpu_is_found_by_the_check(metrics: Metrics) -> None:
    watch, reports = FakeWatch(), Reports()
    monitor = run(opener(watch), metrics, reports)
    try:
        watch.liveness_of["GPU-0"] = Liveness.GONE
        view = reports.wait_for(lambda v: v.gpus[0].status == "unhealthy")
        assert [c.kind for c in view.gpus[0].conditions] == ["gpu-lost"]
        watch.liveness_of["GPU-0"] = Liveness.OK
        reports.wait_for(lambda v: v.gpus[0].status == "healthy")
    finally:
        monitor.stop()


def test_a_gpu_without_events_is_unmonitored_never_healthy(metrics: Metrics) -> None:
    reports = Reports()
    monitor = run(opener(FakeWatch(unsupported=frozenset({"GPU-3"}))), metrics, reports)
    try:
        view = reports.wait_for(lambda v: 3 in v.gpus)
        assert view.gpus[3].status == "unknown"
        assert [(c.kind, c.effect) for c in view.gpus[3].conditions] == [
            ("unmonitored", "None")]
        assert sample(metrics, "gpu_dra_gpu_health", gpu="3", uuid="GPU-3") == 0
    finally:
        monitor.stop()


def test_a_failing_watch_is_logged_and_retried(
        metrics: Metrics, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor_module, "RETRY", Backoff(initial=0.01, jitter=0))
    watch, reports = FakeWatch(), Reports()
    monitor = run(opener(RuntimeError("NVML is gone"), watch), metrics, reports)
    try:
        watch.inject(NvmlEvent(3, "GPU-3", EventKind.DOUBLE_BIT_ECC))
        view = reports.wait_for(lambda v: v.gpus[3].status == "unhealthy")
        assert [c.kind for c in view.gpus[3].conditions] == ["ecc"]
        assert "GPU health monitor failed" in caplog.text
    finally:
        monitor.stop()


def test_the_monitor_stops_within_a_second(metrics: Metrics) -> None:
    monitor = run(opener(FakeWatch()), metrics, Reports())
    time.sleep(0.1)
    begin = time.monotonic()
    monitor.stop()
    assert time.monotonic() - begin < 1.0
    assert not monitor._thread.is_alive()


def test_the_republisher_coalesces_to_one_write_per_interval_and_retries() -> None:
    writes: list[tuple[float, dict[int, GpuHealth]]] = []
    failures = [RuntimeError("API server down")]
    done = threading.Event()

    def publish(health: Any) -> None:
        if failures:
            raise failures.pop()
        writes.append((time.monotonic(), dict(health)))
        if 9 in health:
            done.set()

    republisher = Republisher(publish, interval=0.3, backoff=Backoff(initial=0.05, jitter=0))
    republisher.start()
    try:
        republisher.changed({0: GpuHealth(0)})  # fails, retried after the backoff
        for minor in range(1, 10):  # a flapping GPU: one write carries the latest
            republisher.changed({minor: GpuHealth(minor)})
            time.sleep(0.02)
        assert done.wait(SETTLE)
    finally:
        republisher.stop()
    assert [list(h) for _, h in writes][-1] == [9]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(writes)]
    assert len(writes) <= 2 and all(gap >= 0.29 for gap in gaps), writes
