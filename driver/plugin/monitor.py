"""The health monitor: NVML's events and periodic checks of every watched GPU, folded by
`driver.health` into each GPU's conditions; each transition is logged, counted and handed
to `on_change` (the daemon publishes the taints and pushes the health streams).

One daemon thread: it waits for events with a short timeout (so it stops within a
second), checks every GPU's liveness and recovery action every `check_interval` seconds
and at once when NVML says a GPU was lost. An NVML error ends that watch, is logged, and
a new watch starts after a backoff: the monitor never takes the plugin down. GPUs
discovery could not read are not watched (discovery's verdict stands for them). After a
re-discovery, `watch` replaces the GPUs watched, and a new watch registers them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from driver.health.classify import HealthSettings
from driver.health.coalesce import next_write
from driver.health.model import (
    Check,
    EccEvent,
    GpuHealth,
    Liveness,
    Observation,
    RecoveryAction,
    Transition,
    Unmonitored,
    XidEvent,
)
from driver.health.state import observe
from driver.nvml.events import (
    EventKind,
    EventsLost,
    GpuLiveness,
    NvmlEvent,
    Registration,
)
from driver.nvml.events import RecoveryAction as NvmlRecovery
from driver.plugin.metrics import Metrics
from driver.resourceslice.plan import Backoff

log = logging.getLogger(__name__)

WAIT_S = 0.25  # one event wait: how late a stop is seen
RETRY = Backoff(initial=1.0, cap=30.0)  # after a watch failed
WRITE_INTERVAL = 1.0  # seconds: at most one health write per pool in this time
WRITE_RETRY = Backoff()  # after a failed health write


class Watch(Protocol):
    """What the monitor asks of NVML (`driver.nvml.events.HealthWatch`)."""

    def register(self, uuid: str) -> Registration: ...

    def wait(self, timeout_s: float) -> list[NvmlEvent]: ...

    def liveness(self, uuid: str) -> GpuLiveness: ...

    def recovery_action(self, uuid: str) -> NvmlRecovery | None: ...


@dataclass(frozen=True)
class HealthView:
    """The watched GPUs' health by minor, the cause of each one's latest transition, and
    their UUIDs."""

    gpus: Mapping[int, GpuHealth]
    causes: Mapping[int, str]
    uuids: Mapping[int, str]


OnChange = Callable[[HealthView], None]


# events' liveness (and recovery needs) in driver.health's words: a GPU no longer
# enumerated is lost.
LIVENESS: dict[str, Liveness] = {"answers": "answers", "lost": "lost", "gone": "lost",
                                 "requires-reset": "requires-reset",
                                 "remap-failure": "remap-failure"}
NEEDS: dict[str, RecoveryAction] = {"none": "none", "reset": "reset", "reboot": "reboot",
                                    "drain": "drain"}


def need(action: NvmlRecovery | None) -> RecoveryAction | None:
    """What the driver's recovery action asks of the node; None where it reports none."""
    return None if action is None else NEEDS[action.need]


def observations(event: NvmlEvent, recovery: RecoveryAction | None, at: datetime
                 ) -> list[Observation]:
    """An NVML event as driver.health observations (single-bit ECC errors are corrected:
    none)."""
    if event.kind is EventKind.XID and event.xid is not None:
        return [XidEvent(event.minor, event.xid, at, event.gpu_instance,
                         event.compute_instance, recovery)]
    if event.kind is EventKind.DOUBLE_BIT_ECC:
        return [EccEvent(event.minor, at)]
    return []


def describe(t: Transition, uuid: str) -> str:
    """One log line for a transition: GPU, what changed, XID and its meaning, cause."""
    what = f"{t.kind} {t.change}"
    if t.xid is not None:
        what += f" (XID {t.xid}: {t.meaning})"
    return f"GPU {t.gpu} ({uuid}): {what}, {t.before} -> {t.after}: {t.cause}"


class HealthMonitor:
    """Watches `gpus` (minor -> UUID) through watches that `open_watch` opens."""

    def __init__(self, open_watch: Callable[[], AbstractContextManager[Watch]],
                 gpus: Mapping[int, str], settings: HealthSettings, metrics: Metrics,
                 on_change: OnChange, check_interval: float = 5.0) -> None:
        self._open_watch = open_watch
        self._gpus = dict(gpus)
        self._settings = settings
        self._metrics = metrics
        self._on_change = on_change
        self._interval = check_interval
        self._health = {minor: GpuHealth(minor) for minor in self._gpus}
        self._causes: dict[int, str] = {}
        self._lock = threading.Lock()  # the GPUs and their health: `watch` changes them
        self._rewatch = threading.Event()  # the GPUs changed: register them in a new watch
        # one report at a time: two appliers (events, the admin) never hand on_change
        # their views in the wrong order
        self._reporting = threading.Lock()
        self._stop = threading.Event()
        self._delays: Iterator[float] | None = None
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        for minor, uuid in self._gpus.items():
            metrics.gpu_health.labels(str(minor), uuid).set(1)

    @property
    def view(self) -> HealthView:
        with self._lock:
            return HealthView(dict(self._health), dict(self._causes), dict(self._gpus))

    def watch(self, gpus: Mapping[int, str]) -> None:
        """Watch these GPUs (minor -> UUID) from now on, as a re-discovery found them: a
        GPU that is new, back or replaced starts healthy, one no longer there is forgotten
        (its slices are gone); a new NVML watch registers them."""
        with self._lock:
            for minor, uuid in self._gpus.items():
                if gpus.get(minor) != uuid:
                    del self._health[minor]
                    self._causes.pop(minor, None)
                    self._metrics.gpu_health.remove(str(minor), uuid)
            for minor, uuid in gpus.items():
                if self._gpus.get(minor) != uuid:
                    self._health[minor] = GpuHealth(minor)
                    self._metrics.gpu_health.labels(str(minor), uuid).set(1)
            self._gpus = dict(gpus)
        self._rewatch.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._rewatch.clear()  # before reading the GPUs: a change after it rewatches
            try:
                with self._open_watch() as watch:
                    self._watch(watch)
            except Exception:  # an NVML error, or a bug: logged, and a new watch later
                self._delays = self._delays or RETRY.delays()
                delay = next(self._delays)
                log.exception("GPU health monitor failed; a new watch in %.1fs", delay)
                self._stop.wait(delay)

    def _watch(self, watch: Watch) -> None:
        """Register every GPU, check them, then events and checks until stopped."""
        now = datetime.now(UTC)
        for minor, uuid in self.watched().items():
            registration = watch.register(uuid)
            if not registration.monitored:
                log.warning("GPU %d (%s): events not watched: %s", minor, uuid,
                            registration.reason)
            self.apply([Unmonitored(minor, now, registration.monitored)])
        self._check(watch)
        self._delays = None  # this watch works: a later failure backs off from the start
        next_check = time.monotonic() + self._interval
        while not (self._stop.is_set() or self._rewatch.is_set()):
            try:
                events = watch.wait(min(WAIT_S, max(0.0, next_check - time.monotonic())))
            except EventsLost as err:
                log.warning("%s: checking every GPU now", err)
                events, next_check = [], 0.0
            if events:
                at = datetime.now(UTC)
                found: list[Observation] = []
                for event in events:
                    if event.kind is EventKind.XID and event.xid is not None:
                        self._metrics.xid_events.labels(str(event.minor), str(event.xid)).inc()
                    found += observations(event, need(watch.recovery_action(event.uuid)), at)
                self.apply(found)
            if time.monotonic() >= next_check:
                self._check(watch)
                next_check = time.monotonic() + self._interval

    def _check(self, watch: Watch) -> None:
        at = datetime.now(UTC)
        self.apply([Check(minor, at, LIVENESS[watch.liveness(uuid).state],
                          need(watch.recovery_action(uuid)))
                    for minor, uuid in self.watched().items()])

    def watched(self) -> dict[int, str]:
        """The GPUs watched now, minor -> UUID."""
        with self._lock:
            return dict(self._gpus)

    def apply(self, found: list[Observation]) -> None:
        """Fold observations of watched GPUs; log, count and report the transitions."""
        changed: list[Transition] = []
        with self._lock:
            for observation in found:
                minor = observation.gpu
                if minor not in self._health:
                    continue
                self._health[minor], transitions = observe(self._health[minor], observation,
                                                           self._settings)
                for t in transitions:
                    uuid = self._gpus[minor]
                    (log.warning if t.change == "set" and t.after != "healthy" else log.info)(
                        "%s", describe(t, uuid))
                    self._metrics.health_transitions.labels(str(minor), t.kind, t.change).inc()
                    self._metrics.gpu_health.labels(str(minor), uuid).set(
                        int(self._health[minor].status == "healthy"))
                    self._causes[minor] = t.cause
                changed += transitions
        if changed:
            with self._reporting:
                self._on_change(self.view)


class Republisher:
    """Publishes the slices again with the GPUs' latest health, in a thread of its own so
    the monitor never waits for a write: at most one write per `interval` seconds
    (`coalesce.next_write`), each with the latest health; a failed write is retried with
    `backoff` until one gets through or a newer health replaces it."""

    def __init__(self, publish: Callable[[Mapping[int, GpuHealth]], object],
                 interval: float = WRITE_INTERVAL, backoff: Backoff = WRITE_RETRY) -> None:
        self._publish = publish
        self._interval = interval
        self._backoff = backoff
        self._cond = threading.Condition()
        self._pending: Mapping[int, GpuHealth] | None = None
        self._changed_at = 0.0
        self._last_write: float | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="health-publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def changed(self, health: Mapping[int, GpuHealth]) -> None:
        with self._cond:
            if self._pending is None:
                self._changed_at = time.monotonic()
            self._pending = health
            self._cond.notify_all()

    def _next(self) -> Mapping[int, GpuHealth] | None:
        """The health to write once its time has come; None when stopped."""
        with self._cond:
            while not self._stopped:
                if self._pending is None:
                    self._cond.wait()
                    continue
                wait = next_write(self._last_write, self._changed_at, self._interval) \
                    - time.monotonic()
                if wait <= 0:
                    health, self._pending = self._pending, None
                    self._last_write = time.monotonic()
                    return health
                self._cond.wait(wait)
            return None

    def _run(self) -> None:
        delays: Iterator[float] | None = None
        while (health := self._next()) is not None:
            try:
                self._publish(health)
                delays = None
            except Exception:
                delays = delays or self._backoff.delays()
                delay = next(delays)
                log.warning("publishing the GPUs' health failed; again in %.1fs", delay,
                            exc_info=True)
                with self._cond:
                    if self._pending is None:  # nothing newer: this one again, later
                        self._pending, self._changed_at = health, time.monotonic() + delay
