"""ResourceClaim `status.devices` (KEP-4817): what this driver says about the devices it
prepared for a claim, written to the API server off the prepare path.

Each of the claim's devices of this driver gets one entry (driver, pool, device, and the
shareID of a share): `data` names the hardware (the GPU's UUID; for a MIG device its
parent's UUID, GPU and compute instance ids, profile and placement), `conditions` say
its health as the plugin knows it (`Ready`, and one condition per kind of trouble on
the GPU, as its taints name them). The API allows 8 conditions and 10 KiB of data per
entry; both stay far below.

The entries are written with server-side apply under this driver's field manager, so
the API server merges them with other drivers' entries of the same claim (the list is a
map keyed by driver, pool, device, shareID) and applying an empty list removes exactly
ours: no read-modify-write, no conflict. The claim's UID goes along: a claim deleted and
created again under the same name is refused, never written.

A write never delays prepare or unprepare: `StatusWriter` keeps the wanted state per
claim and a thread of its own writes it, the latest state only, a moment later (SETTLE),
retrying with backoff when the API server cannot be reached; a failed write is logged
and counted. A claim unprepared before its entries were written costs no write; one
deleted before its unprepare (the usual end of a template's claim) needs none.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from driver.health.classify import meaning
from driver.health.model import GpuHealth
from driver.health.taints import gpu_taints, rfc3339
from driver.kube.api import ApiError, api_request
from driver.plugin.checkpoint import PreparedDevice
from driver.plugin.claims import API_VERSION, ClaimError, ClaimRef
from driver.plugin.devices import Target
from driver.plugin.metrics import Metrics
from driver.plugin.monitor import HealthView

log = logging.getLogger(__name__)

CLAIMS = "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}/status"
MAX_CONDITIONS = 8  # resource.AllocatedDeviceStatusMaxConditions
HEALTHY = "prepared; the GPU is healthy"
MAX_MESSAGE = 1024  # the API allows 32768; a message is one line for `kubectl describe`
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds: backoff of a write that failed
# seconds a prepared or unprepared claim waits before its write: the write does not
# compete with the rest of the kubelet's call, and a claim unprepared meanwhile costs none
SETTLE = 0.2
REFRESH_INTERVAL = 1.0  # seconds: health changes re-check the claims at most this often
WRITE_TIMEOUT = 10.0  # seconds one write may take
STOP_WAIT = 2.0  # seconds a stop waits for a write in flight
# Refused for good, retrying cannot help: 400, 403 (RBAC), 404 (claim gone), 409, 422
# (invalid: a claim made again under the name, whose UID differs, or a device no longer
# allocated, or another driver's entry, which the API server's per-driver check refuses).
FINAL = frozenset({400, 403, 404, 409, 422})

# A condition per kind of trouble (driver.health.model.Kind): its type and reason.
KINDS: dict[str, tuple[str, str]] = {
    "out-of-service": ("OutOfService", "AdminRequest"),
    "gpu-lost": ("GpuLost", "GpuLost"),
    "xid": ("XidError", "Xid"),
    "ecc": ("EccError", "DoubleBitEcc"),
    "recovery": ("RecoveryRequired", "Recovery"),
    "remap-failure": ("RowRemapFailure", "RowRemapFailure"),
    "unmonitored": ("Unmonitored", "EventsUnsupported"),
}


@dataclass(frozen=True)
class DeviceHealth:
    """A device's health: the monitor's view of its GPU, or, for a GPU it does not watch,
    discovery's error (None: healthy)."""

    gpu: GpuHealth | None
    error: str | None = None


def device_data(target: Target, device: PreparedDevice, driver_version: str
                ) -> dict[str, Any]:
    """`data`: the hardware behind the device, in the names of its ResourceSlice
    attributes (NVIDIA's), so a user can match the two."""
    gpu = target.gpu
    data: dict[str, Any] = {"productName": gpu.product_name, "driverVersion": driver_version}
    if target.placement is None:
        return {"type": "gpu", "uuid": gpu.uuid, "pciBusID": gpu.pci_bus_id, **data}
    mig: dict[str, Any] = {"type": "mig", "parentUUID": gpu.uuid,
                           "placement": {"start": target.placement.start,
                                         "size": target.placement.size}}
    if target.static_mig is not None:
        live = target.static_mig
        mig |= {"uuid": live.uuid, "profile": live.profile, "gpuInstance": live.gi_id,
                "computeInstance": live.ci_id}
    elif target.dynamic_profile is not None:
        mig["profile"] = target.dynamic_profile.name
        made = device.created_mig
        if made is not None and made.gi_id is not None and made.ci_id is not None:
            mig |= {"gpuInstance": made.gi_id, "computeInstance": made.ci_id}
    return mig | data


def device_conditions(health: DeviceHealth, driver: str, prepared_at: datetime
                      ) -> list[dict[str, Any]]:
    """`Ready` (True: prepared and its GPU healthy; False: unhealthy; Unknown: its GPU's
    events cannot be watched), then a condition per kind of trouble on the GPU, as its
    taints say it (at most 4, the most severe first: within the API's 8)."""
    if health.gpu is None:
        if health.error is None:
            return [_api(_condition("Ready", "True", "Prepared", HEALTHY, prepared_at))]
        return [_api(_condition("Ready", "False", "DiscoveryError", health.error,
                                prepared_at))]
    troubles = []
    for taint in gpu_taints(health.gpu, driver):
        kind = taint.key.removeprefix(f"{driver}/")
        kind_type, reason = _trouble(kind, taint.value)
        message = f"taint {taint.key}{'=' + taint.value if taint.value else ''}:{taint.effect}"
        if kind == "xid" and taint.value.isdigit():
            message += f" ({meaning(int(taint.value))})"
        troubles.append(_condition(kind_type, "True", reason, message, taint.time_added))
    status = health.gpu.status
    if status == "healthy" or not troubles:
        ready = _condition("Ready", "True", "Prepared", HEALTHY, prepared_at)
    else:
        worst = troubles[0]
        ready = _condition("Ready", "False" if status == "unhealthy" else "Unknown",
                           worst["reason"], f"the GPU is {status}: {worst['message']}",
                           worst["since"])
    return [_api(c) for c in [ready, *troubles][:MAX_CONDITIONS]]


def _trouble(kind: str, value: str) -> tuple[str, str]:
    """(type, reason) of one kind of trouble; an XID and a recovery name theirs."""
    kind_type, reason = KINDS[kind]
    if kind == "xid" and value.isdigit():
        reason = f"Xid{value}"
    elif kind == "recovery" and value.isalpha():
        reason = f"Recovery{value.capitalize()}"
    return kind_type, reason


def _condition(kind_type: str, status: str, reason: str, message: str, since: datetime
               ) -> dict[str, Any]:
    return {"type": kind_type, "status": status, "reason": reason,
            "message": message[:MAX_MESSAGE], "since": since}


def _api(condition: Mapping[str, Any]) -> dict[str, Any]:
    """A metav1.Condition as the API takes it."""
    out = {k: v for k, v in condition.items() if k != "since"}
    return out | {"lastTransitionTime": rfc3339(condition["since"])}


def device_status(driver: str, device: PreparedDevice, target: Target | None,
                  health: DeviceHealth, driver_version: str, prepared_at: datetime
                  ) -> dict[str, Any]:
    """One AllocatedDeviceStatus entry; a device no longer published (its GPU gone since)
    has no data and is not Ready."""
    entry: dict[str, Any] = {"driver": driver, "pool": device.pool, "device": device.device}
    if device.share_id is not None:
        entry["shareID"] = device.share_id
    if target is None:
        entry["conditions"] = [_api(_condition("Ready", "False", "DeviceGone", "the device "
                                               "is no longer published by this node",
                                               prepared_at))]
        return entry
    entry["conditions"] = device_conditions(health, driver, prepared_at)
    entry["data"] = device_data(target, device, driver_version)
    return entry


def claim_entries(driver: str, index: Mapping[str, Target], driver_version: str,
                  view: HealthView, devices: Sequence[PreparedDevice],
                  prepared_at: datetime) -> list[dict[str, Any]]:
    """The entries of a claim's devices, with the health the monitor sees now (discovery's,
    for a GPU it does not watch)."""
    entries = []
    for device in devices:
        target = index.get(device.device)
        health = DeviceHealth(None) if target is None else \
            DeviceHealth(view.gpus.get(target.gpu.minor), target.gpu.health_error)
        entries.append(device_status(driver, device, target, health, driver_version,
                                     prepared_at))
    return entries


def settled(previous: Sequence[Mapping[str, Any]] | None,
            entries: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """`entries` with each `Ready`'s lastTransitionTime as metav1 conditions keep it:
    the time written before while its status is the same, `now` when it changed since
    the last write (a GPU healthy again); as computed for an entry written first."""
    before = {_key(e): c for e in previous or () for c in e.get("conditions", ())
              if c["type"] == "Ready"}
    out = []
    for entry in entries:
        old = before.get(_key(entry))
        if old is not None:
            conditions = [c if c["type"] != "Ready" else c | {"lastTransitionTime": (
                old["lastTransitionTime"] if old["status"] == c["status"] else rfc3339(now))}
                for c in entry.get("conditions", ())]
            entry = entry | {"conditions": conditions}
        out.append(entry)
    return out


def _key(entry: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
    """The key of status.devices, a map list."""
    return entry["driver"], entry["pool"], entry["device"], entry.get("shareID")


def apply_body(ref: ClaimRef, entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The server-side apply configuration: the claim, by name and UID, with our entries
    (none: ours are removed)."""
    return {"apiVersion": API_VERSION, "kind": "ResourceClaim",
            "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
            "status": {"devices": list(entries)}}


def api_writer(api: Any, driver: str) -> Callable[[ClaimRef, dict[str, Any]], None]:
    """Writes an apply configuration to the claim's status; ApiError when refused."""

    def write(ref: ClaimRef, body: dict[str, Any]) -> None:
        api_request(api, "PATCH", CLAIMS.format(namespace=ref.namespace, name=ref.name),
                    body, query={"fieldManager": driver, "force": "true"},
                    content_type="application/apply-patch+yaml",
                    timeout=WRITE_TIMEOUT).expect(200)

    return write


@dataclass(frozen=True)
class _Wanted:
    ref: ClaimRef
    devices: tuple[PreparedDevice, ...]  # empty: remove our entries
    prepared_at: datetime


class StatusWriter:
    """Writes the wanted `status.devices` of each claim on a thread of its own: `prepared`
    and `unprepared` only note what is wanted (no I/O), `refresh` notes that health
    changed; the thread writes each claim's latest wanted state once, retrying failed
    writes with backoff until they succeed or are refused for good."""

    def __init__(self, write: Callable[[ClaimRef, dict[str, Any]], None],
                 entries: Callable[[ClaimRef, tuple[PreparedDevice, ...], datetime],
                                   list[dict[str, Any]]],
                 metrics: Metrics, now: Callable[[], datetime]) -> None:
        self._write = write
        self._entries = entries
        self._metrics = metrics
        self._now = now
        self._cond = threading.Condition()
        self._wanted: dict[str, _Wanted] = {}  # prepared claims, and removals to write
        self._written: dict[str, list[dict[str, Any]]] = {}  # as last written, by uid
        self._due: dict[str, float] = {}  # uid -> monotonic time its write is due
        self._queue: list[tuple[float, str]] = []  # a heap of _due's items (and stale ones)
        self._tries: dict[str, int] = {}
        self._sent: set[str] = set()  # claims whose entries may be on the API server
        self._refreshed = 0.0  # monotonic time of the latest refresh
        self._writing = False
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="claim-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Writes still due are dropped (the next start writes its prepared claims again);
        one in flight gets STOP_WAIT seconds, not its whole timeout, to end."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)

    def prepared(self, ref: ClaimRef, devices: tuple[PreparedDevice, ...], *,
                 restored: bool = False) -> None:
        """`restored`: prepared before this process started, so its entries may be on the
        API server already."""
        with self._cond:
            known = self._wanted.get(ref.uid)
            at = known.prepared_at if known is not None and known.devices else self._now()
            if restored:
                self._sent.add(ref.uid)
            self._want(_Wanted(ref, devices, at))

    def unprepared(self, ref: ClaimRef) -> None:
        """Our entries go; a claim this writer does not know (prepared before a restart
        and not found at start) is named by the kubelet's reference, if it is valid."""
        with self._cond:
            known = self._wanted.get(ref.uid)
            if known is None:
                try:
                    ref.check()
                except ClaimError:
                    return
            elif ref.uid not in self._sent:  # nothing written yet: nothing to remove
                self._forget(ref.uid)
                return
            self._want(_Wanted(known.ref if known is not None else ref, (), self._now()))

    def refresh(self) -> None:
        """Health changed: every prepared claim is checked, at most once per
        REFRESH_INTERVAL (a flapping GPU must not flood the API server); those whose
        entries changed are written."""
        with self._cond:
            self._refreshed = max(time.monotonic(), self._refreshed + REFRESH_INTERVAL)
            for wanted in self._wanted.values():
                if wanted.ref.uid not in self._due:
                    self._schedule(wanted.ref.uid, self._refreshed)
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing being written or left to write."""
        with self._cond:
            return not self._due and not self._writing

    def _want(self, wanted: _Wanted) -> None:
        self._wanted[wanted.ref.uid] = wanted
        self._schedule(wanted.ref.uid, time.monotonic() + SETTLE)
        self._tries.pop(wanted.ref.uid, None)
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                uid = self._next()
                if uid is None:
                    return
                wanted = self._wanted[uid]
                del self._due[uid]
                self._sent.add(uid)
                self._writing = True
            try:
                self._write_one(wanted)
            finally:
                with self._cond:
                    self._writing = False

    def _next(self) -> str | None:
        """The claim whose write is due first, once due; None at stop."""
        while not self._stop:
            while self._queue and self._due.get(self._queue[0][1]) != self._queue[0][0]:
                heapq.heappop(self._queue)  # rescheduled or done since
            if self._queue:
                at, uid = self._queue[0]
                wait = at - time.monotonic()
                if wait <= 0:
                    return uid
                self._cond.wait(wait)
            else:
                self._cond.wait()
        return None

    def _write_one(self, wanted: _Wanted) -> None:
        ref = wanted.ref
        entries = settled(self._written.get(ref.uid), self._entries(
            ref, wanted.devices, wanted.prepared_at), self._now()) if wanted.devices else []
        if self._written.get(ref.uid) == entries and wanted.devices:
            return  # a refresh that changed nothing of this claim
        try:
            self._write(ref, apply_body(ref, entries))
        except ApiError as err:
            if wanted.devices or err.result.status != 404:
                self._failed(wanted, str(err), final=err.result.status in FINAL)
                return
            # a claim deleted before its unprepare (its pod's template claim, its
            # namespace): our entries went with it, as wanted
        except Exception as err:  # unreachable, timeout: the API server may come back
            self._failed(wanted, f"cannot reach the API server: {err}", final=False)
            return
        self._metrics.claim_status_writes.labels("success").inc()
        with self._cond:
            if self._wanted.get(ref.uid) is wanted:
                self._tries.pop(ref.uid, None)
                if wanted.devices:
                    self._written[ref.uid] = entries
                else:
                    self._forget(ref.uid)

    def _failed(self, wanted: _Wanted, why: str, *, final: bool) -> None:
        ref = wanted.ref
        self._metrics.claim_status_writes.labels("refused" if final else "error").inc()
        with self._cond:
            if self._wanted.get(ref.uid) is not wanted or ref.uid in self._due:
                return  # wanted changed meanwhile: the new state is due already
            if final:
                log.warning("cannot write status.devices of ResourceClaim %s: %s; not "
                            "retried", ref, why)
                if not wanted.devices:
                    self._forget(ref.uid)
                return
            tries = self._tries[ref.uid] = self._tries.get(ref.uid, 0) + 1
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (tries - 1))
            log.warning("cannot write status.devices of ResourceClaim %s: %s; retrying in "
                        "%.1fs", ref, why, delay)
            self._schedule(ref.uid, time.monotonic() + delay)
            self._cond.notify_all()

    def _schedule(self, uid: str, at: float) -> None:
        self._due[uid] = at
        heapq.heappush(self._queue, (at, uid))

    def _forget(self, uid: str) -> None:
        self._wanted.pop(uid, None)
        self._due.pop(uid, None)
        self._sent.discard(uid)
        self._written.pop(uid, None)
        self._tries.pop(uid, None)
