"""Prepare and unprepare: the plugin's state machine over claims, devices and the checkpoint.

A batch (one kubelet call) goes through four phases, so the checkpoint is saved twice per
call however many claims it carries (each save writes the records it changes, whatever
else is held: `records`):
1. plan, in parallel: read each claim, pick this driver's results in this pool, resolve
   devices and opaque configs (refusing MPS where this node cannot run the claim's daemon,
   and MPS limits that cannot be applied); no side effects, so a bad claim costs nothing;
2. start, under the records' lock: refuse a claim whose devices or shared counters another
   claim holds, by the allocator's own bookkeeping (the ledger, `prepare_conflicts`) over
   the slices this plugin publishes: a whole GPU and its MIG devices, or overlapping MIG
   placements, draw on one counter set; adminAccess is exempt. A claim that asks for
   another time slice than a claim holding the GPU set is refused too (a GPU has one:
   `records.timeslice_conflicts`). Then record every
   accepted claim as PrepareStarted, with the MIG devices it is about to create (written,
   not yet flushed to disk: the finish's save flushes both);
3. act, in parallel: create MIG devices, set time slices, start the claim's MPS daemon,
   write the CDI spec; a claim that fails undoes what it did;
4. finish, under the records' lock, flushed to disk before the answer: PrepareCompleted
   for the claims that succeeded, others removed, but for what their failed rollback left
   on the node (a MIG device NVML would not destroy): that stays recorded, PrepareStarted,
   holding its devices, until the claim's next prepare or the next start rolls it back.
A kill at any point leaves PrepareStarted records, which the next start rolls back.
Unprepare mirrors it: UnprepareStarted, tear down, remove. One claim is never worked on
twice at once (a lock per claim UID); MIG changes lock their GPU. Across processes (the
old and the new pod of a rolling update) every call with work to do holds the node lock
(`nodelock`), and the checkpoint is read again, if it changed, each time this process
takes it; the claims are fetched before, so a slow API server does not hold the other pod
out. The lock is kept between calls while the checkpoint's snapshot lags its journal, and
handed over (the snapshot written whole first) when another process asks for it or at
`close`. A record still half-done when this process holds both the node lock and the
claim's lock was left by a process that died, and is rolled back before the claim is
prepared again.

The claims' MPS daemons run on their own (`mps`); `watch_mps` adopts them at start and
starts again, with their limits, those that die; those down go to the health streams.

A re-discovery swaps what is published (`publish`) between calls, never under one: it
waits for the calls in flight and holds new ones back meanwhile.

The protocol is here; what it keeps is in `records` (the checkpoint and the ledger, kept
in step), what it does to the node is in `effects` (MIG, time slicing, CDI specs).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from driver.inventory.model import Gpu
from driver.kube.quantity import parse_quantity
from driver.plugin import cdi
from driver.plugin.checkpoint import CheckpointError, ClaimRecord, PreparedDevice
from driver.plugin.claims import (
    AllocatedDevice,
    ClaimError,
    ClaimRef,
    ClaimSource,
    claim_allocation,
)
from driver.plugin.claimstatus import StatusWriter
from driver.plugin.config import OpaqueConfig, config_for, memory_bytes
from driver.plugin.effects import ApplyFailure, Effects
from driver.plugin.evidence import is_rebuilt, rebuilt_records
from driver.plugin.exclusion import annotation_key
from driver.plugin.logs import claim_context
from driver.plugin.metrics import Metrics
from driver.plugin.mps import MpsFailure
from driver.plugin.node import DeviceTools, Identity, Paths, Published
from driver.plugin.nodelock import LockFailure, LockTimeout, NodeLock
from driver.plugin.records import Records, timeslices_held
from driver.resourceslice.build import COMPUTE_CAPACITY, whole_gpu_memory

if TYPE_CHECKING:
    from driver.plugin.configschema import DeviceConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

WORKERS = 8
MPS_CHECK_INTERVAL = 2.0  # seconds between checks of the claims' MPS daemons
START_LOCK_TIMEOUT = 120.0  # a start waits this long for the other pod's calls in flight


@dataclass(frozen=True)
class Outcome:
    """One claim's answer: its devices, or an error (and a short reason for metrics, and
    what a failed rollback left on the node, to keep on record)."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str | None = None
    reason: str | None = None
    left: tuple[PreparedDevice, ...] = ()


def _failed(reason: str, message: str) -> Outcome:
    return Outcome(error=message, reason=reason)


@dataclass(frozen=True)
class _Plan:
    """A claim after the plan phase: the devices to prepare, as they will be recorded (MIG
    ids still unknown); or, with `answer`, nothing to do: the claim was prepared before,
    or is refused."""

    ref: ClaimRef
    devices: tuple[PreparedDevice, ...] = ()
    answer: Outcome | None = None


class _KeyedLocks:
    """A lock per key, created on first use and dropped when nobody holds or waits for it
    (claim UIDs are unbounded; the table must not grow with them)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def _ref(self, key: str, delta: int) -> threading.Lock:
        with self._mutex:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            if users + delta:
                self._locks[key] = (lock, users + delta)
            else:
                del self._locks[key]
            return lock

    @contextlib.contextmanager
    def hold(self, keys: Iterable[str], deadline: float) -> Iterator[set[str]]:
        """Take the keys' locks in sorted order, each until the deadline; yields those
        taken (a key another call holds past the deadline is left out)."""
        taken: list[tuple[str, threading.Lock]] = []
        try:
            for key in sorted(keys):
                lock = self._ref(key, +1)
                if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    taken.append((key, lock))
                else:
                    self._ref(key, -1)
            yield {key for key, _ in taken}
        finally:
            for key, lock in taken:
                lock.release()
                self._ref(key, -1)

    def __len__(self) -> int:
        return len(self._locks)


class _Gate:
    """Calls run side by side; a change of what is published (re-discovery) waits for those
    in flight and holds new ones back until it is done, so a call sees one `Published`
    from plan to finish."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls = 0
        self._changing = False

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._changing)
            self._calls += 1
        try:
            yield
        finally:
            with self._cond:
                self._calls -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def change(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._changing)
            self._changing = True
            self._cond.wait_for(lambda: self._calls == 0)
        try:
            yield
        finally:
            with self._cond:
                self._changing = False
                self._cond.notify_all()


@dataclass(frozen=True)
class MpsProblem:
    """A device's claims whose MPS daemon is down, for its health on the streams:
    `unhealthy` when no claim on it has a working daemon (see `mps_problems`)."""

    message: str
    unhealthy: bool


def mps_problems(down: Mapping[str, Sequence[tuple[str, str]]],
                 users: Mapping[str, set[str]]) -> dict[str, MpsProblem]:
    """By device name, from the (claim uid, message) of each down daemon on it and the
    uids of all claims prepared on it. The kubelet gives a device's health to every pod
    using it, so a device shared by claims whose daemons still answer stays healthy (the
    message names the down ones): one claim's dead daemon must not mark the others' pods
    unhealthy."""
    return {device: MpsProblem("; ".join(why for _, why in problems),
                               unhealthy=users.get(device, set()) <= {uid for uid, _ in problems})
            for device, problems in down.items()}


class PluginState:
    """Prepare and unprepare over this node's records and effects; see the module."""

    def __init__(self, *, identity: Identity, paths: Paths, published: Published,
                 tools: DeviceTools, claim_source: ClaimSource, metrics: Metrics,
                 status: StatusWriter | None = None) -> None:
        self.identity = identity
        self.status = status  # in a cluster: the claims' status.devices
        self.published = published
        self.claim_source = claim_source
        self.metrics = metrics
        self.records = Records(identity, paths.checkpoint, published.slices, metrics)
        self.effects = Effects(identity.driver, paths.cdi_root, published, tools)
        self._node_lock = NodeLock(paths.node_lock, self.records.reload,
                                   on_release=self.records.compact,
                                   linger=lambda: self.records.lagging)
        self._claim_locks = _KeyedLocks()
        self._gate = _Gate()
        self._workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="claim")

    def close(self) -> None:
        """At a graceful stop: the node lock let go, every claim written into the
        snapshot first (a release that reads no journal may start next)."""
        self._workers.shutdown(wait=True)
        self._node_lock.close()

    def publish(self, published: Published, tools: DeviceTools) -> None:
        """Serve what a re-discovery found (and the device nodes and driver files that go
        with it) from now on, once the calls in flight are done. A claim on a device no
        longer published keeps its record and can be unprepared: teardown reads only the
        record."""
        with self._gate.change():
            with self.records.lock:
                self.records.publish(published.slices)
            self.published = self.effects.published = published
            self.effects.tools = tools

    # -- start -------------------------------------------------------------------------

    def recover(self, also: Callable[[], object] = lambda: None) -> None:
        """Make the node match the checkpoint before the first call: void it after a reboot,
        roll back what was half-done, restore missing specs, remove orphans; then run `also`
        under the same hold. Under the node lock: another pod's calls in flight are never
        taken for half-done work."""
        try:
            with self._node_lock.hold(time.monotonic() + START_LOCK_TIMEOUT):
                self._recover()
                also()
        except (LockTimeout, LockFailure) as err:
            raise OSError(str(err)) from None

    def _recover(self) -> None:
        claims = self.records.load()
        if claims is None:  # a first start, or the checkpoint was lost: ask the node
            claims = self._rebuild_records()

        def held(gpu_uuid: str, besides: str) -> dict[str, str]:  # the records held yet
            return timeslices_held(claims.values(), gpu_uuid, besides)

        for uid, record in list(claims.items()):
            if record.state == "PrepareCompleted":
                continue
            with claim_context(uid):
                log.info("rolling back %s of ResourceClaim %s/%s", record.state,
                         record.namespace, record.name)
                problems = self.effects.teardown(uid, record.devices, held)
            if problems:
                log.error("cannot roll back ResourceClaim %s/%s (%s): %s; kept for the next "
                          "start", record.namespace, record.name, uid, "; ".join(problems))
            else:
                del claims[uid]
        self.records.save_all(claims)
        for uid, record in claims.items():
            if record.state == "PrepareCompleted" and not self.effects.has_spec(uid):
                with claim_context(uid):
                    log.warning("CDI spec of prepared ResourceClaim %s/%s is missing; "
                                "writing it again", record.namespace, record.name)
                    try:
                        self.effects.write_spec(uid, record.devices)
                    except (ClaimError, OSError) as err:  # e.g. its GPU is gone
                        log.error("cannot write the CDI spec again: %s", err)
        if self.published.dynamic_mig:
            self.effects.sweep_mig(claims.values())
        self.effects.remove_specs_except(claims)
        self.effects.sweep_mps(claims)

    def _rebuild_records(self) -> dict[str, ClaimRecord]:
        """Records for the claims whose CDI specs are on the node (see `evidence`): their
        devices stay held and nothing of theirs is swept."""
        specs = self.effects.claim_specs()
        claims, problems = rebuilt_records(specs, self.identity.driver, self.identity.node,
                                           self.published.index)
        for problem in problems:
            log.warning("rebuilding the records: %s", problem)
        for uid, record in claims.items():
            with claim_context(uid):
                log.warning("no checkpoint, but a CDI spec of ResourceClaim %s: kept as "
                            "prepared, holding %s, until the kubelet unprepares it", uid,
                            ", ".join(d.device for d in record.devices) or "no known device")
        return claims

    # -- MPS daemons -------------------------------------------------------------------

    def watch_mps(self, stop: threading.Event,
                  report: Callable[[dict[str, MpsProblem]], None]) -> None:
        """`check_mps` at once (a start adopts the daemons running), then every
        MPS_CHECK_INTERVAL seconds until `stop`; each round's down daemons go to `report`
        (the health streams') by device name."""
        pids: dict[str, int] = {}
        while True:
            report(self.check_mps(pids))
            if stop.wait(MPS_CHECK_INTERVAL):
                return

    def check_mps(self, pids: dict[str, int]) -> dict[str, MpsProblem]:
        """Each prepared MPS claim's daemon: one running is kept (`pids`: as last seen,
        logged when it changes: adopted), one that died is reported (log, metric) and
        started again with the claim's limits (a pod's by its kubelet, which `ensure`
        tells from the pod's count of starts). A claim being worked on is left to that
        call. Returns the devices of the claims whose daemon is still down (see
        `mps_problems`)."""
        with self.records.lock:
            uids = [uid for uid in self.records
                    if self.records[uid].state == "PrepareCompleted"
                    and any(d.mps is not None for d in self.records[uid].devices)]
            users: dict[str, set[str]] = defaultdict(set)
            for uid in self.records:
                if self.records[uid].state == "PrepareCompleted":
                    for device in self.records[uid].devices:
                        users[device.device].add(uid)
        down: dict[str, list[tuple[str, str]]] = defaultdict(list)
        counts = {"running": 0, "failed": 0}
        for uid in uids:
            with self._claim_locks.hold([uid], time.monotonic()) as held, \
                    claim_context(uid):
                record = self.records.get(uid)
                if not held or record is None or record.state != "PrepareCompleted":
                    continue
                try:
                    pid, restarted = self.effects.tools.mps.ensure(uid)
                except MpsFailure as err:
                    log.error("MPS daemon of ResourceClaim %s/%s is not running: %s",
                              record.namespace, record.name, err)
                    counts["failed"] += 1
                    why = (f"MPS daemon of claim {record.namespace}/{record.name} ({uid}) "
                           f"is down: {err}; starting it again")
                    for device in record.devices:
                        down[device.device].append((uid, why))
                    continue
                counts["running"] += 1
                if restarted:
                    self.metrics.mps_restarts.inc()
                    log.error("MPS daemon of ResourceClaim %s/%s had died; started again "
                              "with its limits as %d", record.namespace, record.name, pid)
                elif pids.get(uid) != pid:
                    log.info("MPS daemon %d of ResourceClaim %s/%s is running", pid,
                             record.namespace, record.name)
                pids[uid] = pid
        for gone in pids.keys() - set(uids):
            del pids[gone]
        for state, count in counts.items():
            self.metrics.mps_daemons.labels(state).set(count)
        return mps_problems(down, users)

    # -- prepare -----------------------------------------------------------------------

    def prepare(self, refs: Sequence[ClaimRef], deadline: float) -> dict[str, Outcome]:
        outcomes, unique = self._admit(refs)
        with self._claim_locks.hold(unique, deadline) as held:
            for uid in unique.keys() - held:
                outcomes[uid] = _failed("busy", "another call is working on this claim")
            mine = [unique[uid] for uid in sorted(held)]
            # what `_plan` reads, fetched before the node lock: every claim but those
            # prepared (a record rebuilt from its spec is filled in from its claim)
            to_fetch = [ref for ref in mine if not self.records.prepared(ref.uid)
                        or is_rebuilt(self.records[ref.uid])]
            fetched = dict(zip((ref.uid for ref in to_fetch),
                               self._parallel(self._fetch, to_fetch), strict=True))
            self._serialized(held, outcomes, deadline, lambda: self._prepare_held(
                mine, fetched, outcomes, deadline))
        for outcome in outcomes.values():
            self.metrics.claim_done("prepare", outcome.reason if outcome.error else None)
        if self.status is not None:  # noted here, written by its own thread
            for ref in unique.values():
                done = outcomes.get(ref.uid)
                if done is not None and done.error is None:
                    self.status.prepared(ref, done.devices)
        return outcomes

    def prepared_claims(self) -> list[tuple[ClaimRef, tuple[PreparedDevice, ...]]]:
        """The claims prepared on this node and their devices (their status is written
        again at start: health may have changed while the plugin was away); not those
        rebuilt from CDI specs, whose name is unknown until the kubelet prepares them
        again."""
        with self.records.lock:
            return [(ClaimRef(r.namespace, r.name, r.uid), r.devices)
                    for r in map(self.records.__getitem__, self.records)
                    if r.state == "PrepareCompleted" and not is_rebuilt(r)]

    def _serialized(self, uids: set[str], outcomes: dict[str, Outcome], deadline: float,
                    work: Callable[[], None]) -> None:
        """Run `work` under the node lock, if there is any; if the lock or the checkpoint
        another process wrote cannot be had, every claim of the call fails with the
        reason."""
        if not uids:
            return
        try:
            with self._node_lock.hold(deadline), self._gate.call():
                work()
        except LockTimeout as err:
            for uid in uids:
                outcomes[uid] = _failed("busy", str(err))
        except (LockFailure, CheckpointError) as err:
            log.error("%s", err)
            for uid in uids:
                outcomes[uid] = _failed("internal", str(err))

    def _fetch(self, ref: ClaimRef) -> dict[str, Any] | Exception:
        """The claim from its source, or why not (raised again by `_plan` if the claim
        still needs it once the node lock is held)."""
        with claim_context(ref.uid):
            try:
                return self.claim_source.get(ref)
            except Exception as err:  # ClaimError, or a bug: _plan answers it
                return err

    def _prepare_held(self, refs: list[ClaimRef], fetched: Mapping[str, Any],
                      outcomes: dict[str, Outcome], deadline: float) -> None:
        plans = self._parallel(lambda ref: self._plan(ref, fetched), refs)
        for plan in plans:
            if plan.answer is not None:
                outcomes[plan.ref.uid] = plan.answer
        accepted = self._start([plan for plan in plans if plan.answer is None], outcomes)
        acted = self._parallel(lambda p: self._act(p, deadline), accepted)
        self._finish(accepted, acted, outcomes)

    def _admit(self, refs: Sequence[ClaimRef]) -> tuple[dict[str, Outcome], dict[str, ClaimRef]]:
        """Answer malformed and repeated claims at once; the rest, by UID."""
        outcomes: dict[str, Outcome] = {}
        counts: defaultdict[str, int] = defaultdict(int)
        for ref in refs:
            counts[ref.uid] += 1
        unique: dict[str, ClaimRef] = {}
        for ref in refs:
            try:
                ref.check()
            except ClaimError as err:
                outcomes[ref.uid] = _failed(err.reason, str(err))
                continue
            if counts[ref.uid] > 1:
                outcomes[ref.uid] = _failed("bad_request", f"claim {ref.uid} appears "
                                                           f"{counts[ref.uid]} times in the call")
                continue
            unique[ref.uid] = ref
        return outcomes, unique

    def _parallel(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._workers.map(fn, items))

    # 1. plan

    def _plan(self, ref: ClaimRef, fetched: Mapping[str, Any]) -> _Plan:
        with claim_context(ref.uid):
            record = self.records.get(ref.uid)
            if record is not None and record.state != "PrepareCompleted":
                problems = self._roll_back_stale(record)
                if problems:
                    return _Plan(ref, answer=_failed(
                        "device_error", f"ResourceClaim {ref} was left {record.state}: "
                                        f"rolling it back failed: {'; '.join(problems)}"))
                record = None
            try:
                if record is not None and not is_rebuilt(record):
                    if not self.effects.has_spec(ref.uid):
                        self.effects.write_spec(ref.uid, record.devices)
                    log.debug("ResourceClaim %s is already prepared", ref)
                    return _Plan(ref, answer=Outcome(devices=record.devices))
                # not fetched: it was prepared before this process took the lock
                claim = fetched[ref.uid] if ref.uid in fetched else self.claim_source.get(ref)
                if isinstance(claim, Exception):
                    raise claim
                allocation = claim_allocation(claim, self.identity.driver, self.identity.node)
                devices = tuple(self._planned(ref, result, allocation.configs)
                                for result in allocation.devices)
                self.effects.mps_setup(devices)  # its limits are refused before any effect
                if record is not None:
                    return _Plan(ref, answer=self._fill_in(ref, record, devices))
            except ClaimError as err:
                log.info("cannot prepare ResourceClaim %s: %s", ref, err)
                return _Plan(ref, answer=_failed(err.reason, str(err)))
            except Exception as err:  # a bug must fail this claim, not the call
                log.exception("preparing ResourceClaim %s failed", ref)
                return _Plan(ref, answer=_failed("internal", f"internal error: {err!r}"))
            return _Plan(ref, devices)

    def _fill_in(self, ref: ClaimRef, record: ClaimRecord,
                 planned: tuple[PreparedDevice, ...]) -> Outcome:
        """A claim prepared again whose record was rebuilt from its CDI spec (`evidence`):
        its allocation gives back what the spec could not say (its name, requests,
        adminAccess, config), and the record takes it, devices unchanged; an allocation
        of other devices is refused."""
        if sorted(d.device for d in planned) != sorted(d.device for d in record.devices):
            return _failed("in_use", f"ResourceClaim {ref} is allocated "
                                     f"{', '.join(d.device for d in planned) or 'no device'}"
                                     f", but this node holds "
                                     f"{', '.join(d.device for d in record.devices) or 'none'}"
                                     " for it (its record was rebuilt from its CDI spec): "
                                     "unprepare it first")
        adopted = ClaimRecord(ref.uid, ref.namespace, ref.name, "PrepareCompleted", planned)
        with self.records.lock:
            try:
                self.records.save({ref.uid: adopted})
            except OSError as err:
                return _failed("internal", f"cannot write the checkpoint: {err}")
        log.info("ResourceClaim %s, kept from its CDI spec, has its record again", ref)
        return Outcome(devices=planned)

    def _roll_back_stale(self, record: ClaimRecord) -> list[str]:
        """Undo a record a dead process or a failed rollback left half-done (this call holds
        the claim's lock and the node lock, so nobody else is working on it) and forget it."""
        log.warning("ResourceClaim %s/%s was left %s by a plugin process that stopped or a "
                    "rollback that failed; rolling it back", record.namespace, record.name,
                    record.state)
        problems = self.effects.teardown(record.uid, record.devices,
                                         self.records.timeslices_held)
        if problems:
            return problems
        with self.records.lock:
            try:
                self.records.save({record.uid: None})
            except OSError as err:
                return [f"cannot write the checkpoint: {err}"]
        return []

    def _planned(self, ref: ClaimRef, result: AllocatedDevice,
                 configs: Sequence[OpaqueConfig]) -> PreparedDevice:
        driver = self.identity.driver
        target = self.published.index.get(result.device)
        left = self.published.excluded.get(result.device)
        if target is None and left is not None:
            raise ClaimError("excluded_device", f"device {result.device} (request "
                                                f"{result.request}) is on GPU {left.uuid}, "
                                                f"which this node excludes (--exclude-gpus "
                                                f"or the Node annotation {annotation_key(driver)})"
                                                f": it is not this driver's to prepare")
        if target is None:
            raise ClaimError("unknown_device", f"device {result.device} (request "
                                               f"{result.request}) is not published by "
                                               f"this node")
        chosen = config_for(configs, result.request)
        # by kind, not class: the config models load with the first config (configschema)
        expected = "GpuConfig" if target.kind == "gpu" else "MigDeviceConfig"
        if chosen is not None and chosen.config.kind != expected:
            raise ClaimError("bad_config", f"status.allocation.devices.config[{chosen.index}]:"
                                           f" a {chosen.config.kind} does not apply to "
                                           f"{target.kind} device {result.device} (request "
                                           f"{result.request}); use {expected}")
        created = None
        if target.dynamic_profile is not None:
            if result.admin_access:
                raise ClaimError("bad_request", f"device {result.device}: adminAccess to a "
                                                "dynamic MIG device is not supported")
            created = target.mig_to_create
        config = chosen.config if chosen is not None else None
        source = "" if chosen is None else \
            f"sharing strategy MPS (status.allocation.devices.config[{chosen.index}])"
        if result.share_id is not None and not result.admin_access and \
                shared_by_capacity(self.published, result.device):
            config = _share_config(ref, result, target.gpu, chosen)
            source = f"MPS for the consumedCapacity of shareID {result.share_id}"
        mps = None
        if config is not None and config.sharing is not None and \
                config.sharing.strategy == "MPS":
            mps = self._mps_directory(ref, result, source, created is not None)
        timeslice = None  # an adminAccess user does not own the GPU's settings
        if config is not None and config.kind == "GpuConfig" and \
                config.sharing is not None and not result.admin_access:
            timeslice = config.sharing.timeslice
        return PreparedDevice(
            request_names=(result.base_request,), pool=result.pool, device=result.device,
            cdi_device_ids=(cdi.qualified_name(driver, cdi.device_name(ref.uid, result.device)),),
            gpu_uuid=target.gpu.uuid, admin_access=result.admin_access,
            share_id=result.share_id, created_mig=created, timeslice=timeslice,
            config=config.model_dump(exclude_none=True) if config is not None else None,
            mps=mps)

    def _mps_directory(self, ref: ClaimRef, result: AllocatedDevice, source: str,
                       dynamic_mig: bool) -> str:
        """The directory of the claim's MPS daemon, for a device whose config asks for MPS;
        ClaimError where this node or this device cannot have it."""
        why = self.effects.tools.mps.unsupported
        if result.admin_access:
            why = "an adminAccess user does not own the GPU's settings"
        elif dynamic_mig:
            why = ("not on a MIG device created on demand (dynamic MIG), as in NVIDIA's "
                   "driver")
        if why is not None:
            raise ClaimError("unsupported", f"ResourceClaim {ref}: device {result.device} "
                                            f"(request {result.request}): {source} is "
                                            f"refused: {why}")
        return str(self.effects.tools.mps.directory(ref.uid))

    # 2. start

    def _start(self, plans: list[_Plan], outcomes: dict[str, Outcome]) -> list[_Plan]:
        """Refuse plans whose devices or counters other claims hold; record the rest as
        started (each accepted plan holds its devices for the ones after it)."""
        with self.records.lock:
            started: dict[str, ClaimRecord | None] = {}
            accepted = []
            for plan in plans:
                problems = self.records.take(plan.ref, plan.devices,
                                             [r for r in started.values() if r is not None])
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    message = f"cannot prepare ResourceClaim {plan.ref}: {problems[0]}{more}"
                    with claim_context(plan.ref.uid):
                        log.warning("%s", message)
                    outcomes[plan.ref.uid] = _failed("in_use", message)
                    continue
                accepted.append(plan)
                started[plan.ref.uid] = ClaimRecord(plan.ref.uid, plan.ref.namespace,
                                                    plan.ref.name, "PrepareStarted", plan.devices)
            if not accepted:
                return []
            try:
                # Written before the side effects, flushed to disk by `_finish`'s save before
                # the kubelet gets an answer: a killed process leaves the line in the page
                # cache for the next start, and a crash of the OS voids every record (boot
                # id), so one fdatasync a call (about 0.6 ms on ext4) bought nothing.
                self.records.save(started, durable=False)
            except OSError as err:
                self.records.forget_unsaved(started)
                for plan in accepted:
                    outcomes[plan.ref.uid] = _failed("internal", f"cannot write the checkpoint:"
                                                                 f" {err}")
                return []
            return accepted

    # 3. act

    def _act(self, plan: _Plan, deadline: float) -> Outcome:
        started = time.monotonic()
        with claim_context(plan.ref.uid):
            if started > deadline:
                return _failed("timeout", "the kubelet's deadline passed before this claim's "
                                          "turn; it will retry")
            try:
                done = self.effects.apply(plan.ref, plan.devices,
                                          self.records.timeslices_held)
            except ApplyFailure as err:
                return Outcome(error=str(err), reason=err.reason, left=err.left)
            self.metrics.claim_latency.labels("prepare").observe(time.monotonic() - started)
            log.info("prepared ResourceClaim %s: %s", plan.ref,
                     ", ".join(d.device for d in done) or "no devices of this driver")
            return Outcome(devices=done)

    # 4. finish

    def _finish(self, plans: list[_Plan], acted: list[Outcome],
                outcomes: dict[str, Outcome]) -> None:
        if not plans:
            return
        with self.records.lock:
            finished: dict[str, ClaimRecord | None] = {}
            for plan, outcome in zip(plans, acted, strict=True):
                outcomes[plan.ref.uid] = outcome
                started = self.records[plan.ref.uid]
                if outcome.error is None:
                    finished[plan.ref.uid] = started.with_state("PrepareCompleted",
                                                                outcome.devices)
                elif outcome.left:
                    finished[plan.ref.uid] = started.with_state("PrepareStarted", outcome.left)
                    outcomes[plan.ref.uid] = replace(outcome, error=(
                        f"{outcome.error}; kept on record, rolled back when the claim is "
                        "prepared again or the plugin restarts"))
                    with claim_context(plan.ref.uid):
                        log.error("ResourceClaim %s: %s", plan.ref,
                                  outcomes[plan.ref.uid].error)
                else:
                    finished[plan.ref.uid] = None
            try:
                self.records.save(finished)
            except OSError as err:
                self._abandon(plans, acted, outcomes, err)

    def _abandon(self, plans: list[_Plan], acted: list[Outcome], outcomes: dict[str, Outcome],
                 err: OSError) -> None:
        """The checkpoint cannot be written: undo the batch; its PrepareStarted records on
        disk make the next start finish any undo that fails here."""
        for plan, outcome in zip(plans, acted, strict=True):
            if outcome.error is None:
                with claim_context(plan.ref.uid):
                    self.effects.teardown(plan.ref.uid, outcome.devices,
                                          self.records.timeslices_held)
            outcomes[plan.ref.uid] = _failed("internal", f"cannot write the checkpoint: {err}")

    # -- unprepare ---------------------------------------------------------------------

    def unprepare(self, refs: Sequence[ClaimRef], deadline: float) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        uids: set[str] = set()
        for ref in refs:
            try:
                ClaimRef("default", "x", ref.uid).check()  # only the UID names a file here
            except ClaimError as err:
                outcomes[ref.uid] = _failed(err.reason, str(err))
                continue
            uids.add(ref.uid)
        with self._claim_locks.hold(uids, deadline) as held:
            for uid in uids - held:
                outcomes[uid] = _failed("busy", "another call is working on this claim")
            self._serialized(held, outcomes, deadline,
                             lambda: self._unprepare_held(held, outcomes))
        for outcome in outcomes.values():
            self.metrics.claim_done("unprepare", outcome.reason if outcome.error else None)
        if self.status is not None:
            for ref in refs:
                done = outcomes.get(ref.uid)
                if ref.uid in uids and done is not None and done.error is None:
                    self.status.unprepared(ref)
        return outcomes

    def _unprepare_held(self, uids: set[str], outcomes: dict[str, Outcome]) -> None:
        records = self._begin_unprepare(uids, outcomes)
        results = self._parallel(self._unprepare_one, list(records.values()))
        self._end_unprepare(records, results, outcomes)
        for uid in uids - records.keys() - outcomes.keys():
            self.effects.remove_spec(uid)  # unknown: nothing to undo
            outcomes[uid] = Outcome()

    def _begin_unprepare(self, uids: set[str], outcomes: dict[str, Outcome]
                         ) -> dict[str, ClaimRecord]:
        with self.records.lock:
            records = {uid: self.records[uid].with_state("UnprepareStarted")
                       for uid in uids if uid in self.records}
            if not records:
                return {}
            try:
                self.records.save(records)
            except OSError as err:
                for uid in records:
                    outcomes[uid] = _failed("internal", f"cannot write the checkpoint: {err}")
                return {}
            return records

    def _unprepare_one(self, record: ClaimRecord) -> list[str]:
        started = time.monotonic()
        with claim_context(record.uid):
            problems = self.effects.teardown(record.uid, record.devices,
                                             self.records.timeslices_held)
            if problems:
                log.error("unpreparing ResourceClaim %s/%s failed: %s", record.namespace,
                          record.name, "; ".join(problems))
            else:
                log.info("unprepared ResourceClaim %s/%s", record.namespace, record.name)
        self.metrics.claim_latency.labels("unprepare").observe(time.monotonic() - started)
        return problems

    def _end_unprepare(self, records: dict[str, ClaimRecord], results: list[list[str]],
                       outcomes: dict[str, Outcome]) -> None:
        if not records:
            return
        with self.records.lock:
            removed: dict[str, ClaimRecord | None] = {}
            for uid, problems in zip(records, results, strict=True):
                if problems:
                    outcomes[uid] = _failed("device_error", "; ".join(problems))
                else:
                    removed[uid] = None
                    outcomes[uid] = Outcome()
            try:
                self.records.save(removed)
            except OSError as err:  # the records stay UnprepareStarted on disk: redone at start
                for uid in records:
                    outcomes[uid] = _failed("internal", f"cannot write the checkpoint: {err}")


def shared_by_capacity(published: Published, device: str) -> bool:
    """Whether the node publishes `device` with allowMultipleAllocations (consumable
    mode)."""
    return any(d.get("name") == device and d.get("allowMultipleAllocations")
               for s in published.slices for d in s["spec"].get("devices", []))


def _share_config(ref: ClaimRef, result: AllocatedDevice, gpu: Gpu,
                  chosen: OpaqueConfig | None) -> DeviceConfig | None:
    """The config of one share of a GPU shared by capacity: MPS whose pinned memory limit
    and active thread percentage are what the scheduler counted for it (consumedCapacity),
    so a claim cannot take more than the others were left. A share of all the GPU's memory
    (a claim that asked for none) leaves room for no other claim: the GPU is its own, as in
    exclusive mode, with no daemon. ClaimError for a sharing config of the claim's own (its
    limits are its capacity) or a share that does not say what it consumed."""
    from driver.plugin.configschema import GpuConfig, GpuSharing, MpsConfig  # see its module

    where = f"ResourceClaim {ref}: device {result.device} (request {result.request})"
    if chosen is not None and isinstance(chosen.config, GpuConfig) and \
            chosen.config.sharing is not None:
        raise ClaimError("bad_config", f"{where}: status.allocation.devices.config"
                                       f"[{chosen.index}].sharing does not apply: the GPU is "
                                       "shared by capacity (--gpu-sharing consumable), and "
                                       "its MPS limits are the claim's consumedCapacity")
    try:
        memory = memory_bytes(result.consumed["memory"])
        compute = int(parse_quantity(result.consumed.get(COMPUTE_CAPACITY, "0")))
    except (KeyError, ValueError) as err:
        raise ClaimError("bad_claim", f"{where}: consumedCapacity of shareID "
                                      f"{result.share_id} has no valid memory and compute "
                                      f"({err})") from None
    if memory >= whole_gpu_memory(gpu):
        return chosen.config if chosen is not None else None
    return GpuConfig(apiVersion="gpu.dra.dev/v1alpha1", kind="GpuConfig", sharing=GpuSharing(
        strategy="MPS", mpsConfig=MpsConfig(defaultActiveThreadPercentage=compute or None,
                                            defaultPinnedDeviceMemoryLimit=str(memory))))
