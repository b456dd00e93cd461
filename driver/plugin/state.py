"""Prepare and unprepare: the plugin's state machine over claims, devices and the checkpoint.

A batch (one kubelet call) goes through four phases, so the checkpoint is written twice
per call however many claims it carries:
1. plan, in parallel: read each claim, pick this driver's results in this pool, resolve
   devices and opaque configs; no side effects, so a bad claim costs nothing;
2. under the ledger lock: refuse a claim whose devices or shared counters another claim
   holds, by the allocator's own bookkeeping (`Ledger`, `prepare_conflicts`) over the
   slices this plugin publishes: a whole GPU and its MIG devices, or overlapping MIG
   placements, draw on one counter set; adminAccess is exempt. Then record every
   accepted claim as PrepareStarted, with the MIG devices it is about to create;
3. act, in parallel: create MIG devices, set time slices, write the CDI spec; a claim that
   fails undoes what it did;
4. under the ledger lock: PrepareCompleted for the claims that succeeded, others removed.
A kill at any point leaves PrepareStarted records, which the next start rolls back.
Unprepare mirrors it: UnprepareStarted, tear down, remove. One claim is never worked on
twice at once (a lock per claim UID); MIG changes lock their GPU. Across processes (the
old and the new pod of a rolling update) every call with work to do holds the node lock
(`nodelock`), and the checkpoint is read again each time this process takes it; the
claims are fetched before, so a slow API server does not hold the other pod out. A record
still half-done when this process holds both the node lock and the claim's lock was left
by a process that died, and is rolled back before the claim is prepared again.
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
from pathlib import Path
from typing import Any, TypeVar

from driver.allocator import Ledger, Node, prepare_conflicts
from driver.allocator.pools import gather_pools
from driver.atomicfile import remove_leftovers
from driver.errors import DriverError
from driver.inventory.model import Inventory
from driver.nvml import HostView
from driver.plugin import cdi, checkpoint
from driver.plugin.cdi import DeviceNode, DriverFiles
from driver.plugin.checkpoint import (
    Checkpoint,
    CheckpointError,
    ClaimRecord,
    MigInstance,
    PreparedDevice,
)
from driver.plugin.claims import (
    AllocatedDevice,
    ClaimError,
    ClaimRef,
    ClaimSource,
    claim_allocation,
)
from driver.plugin.config import GpuConfig, MigDeviceConfig, OpaqueConfig, config_for
from driver.plugin.devices import Target
from driver.plugin.driverfiles import HostDevices
from driver.plugin.logs import claim_context
from driver.plugin.metrics import Metrics
from driver.plugin.mig import MigFailure, MigManager
from driver.plugin.nodelock import LockFailure, LockTimeout, NodeLock
from driver.plugin.sharing import SharingFailure, Timeslicer

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

WORKERS = 8
START_LOCK_TIMEOUT = 120.0  # a start waits this long for the other pod's calls in flight


@dataclass(frozen=True)
class Outcome:
    """One claim's answer: its devices, or an error (and a short reason for metrics)."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str | None = None
    reason: str | None = None


def _failed(reason: str, message: str) -> Outcome:
    return Outcome(error=message, reason=reason)


def ledger_key(namespace: str, name: str, uid: str) -> str:
    """A claim in the ledger, as conflict messages name it: by UID too, since a claim
    deleted and created again under its name is another claim."""
    return f"ResourceClaim {namespace}/{name} ({uid})"


def _record_key(record: ClaimRecord) -> str:
    return ledger_key(record.namespace, record.name, record.uid)


@dataclass(frozen=True)
class _Plan:
    ref: ClaimRef
    devices: tuple[PreparedDevice, ...]  # as they will be recorded, MIG ids still unknown


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


class PluginState:
    def __init__(self, *, driver: str, pool: str, inventory: Inventory,
                 index: dict[str, Target], claims: ClaimSource, cdi_root: Path,
                 files: DriverFiles, devices: HostDevices, host: HostView,
                 mig: MigManager, timeslicer: Timeslicer, checkpoint_path: Path, boot_id: str,
                 metrics: Metrics, dynamic_mig: bool, slices: Sequence[Mapping[str, Any]],
                 lock_path: Path) -> None:
        self.driver = driver
        self.pool = pool
        self.inventory = inventory
        self.index = index
        self.claims = claims
        self.cdi_root = cdi_root
        self.files = files
        self.devices = devices
        self.host = host
        self.mig = mig
        self.timeslicer = timeslicer
        self.checkpoint_path = checkpoint_path
        self.metrics = metrics
        self.dynamic_mig = dynamic_mig
        # What this plugin publishes: its devices and the counters they consume.
        self.pools = gather_pools(slices, Node(pool))
        self._checkpoint = Checkpoint(boot_id=boot_id)
        self._boot_id = boot_id
        self._book = Ledger()  # the allocation results of every claim in the checkpoint
        self._ledger = threading.Lock()
        self._node_lock = NodeLock(lock_path, self._reload)
        self._claim_locks = _KeyedLocks()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="claim")

    # -- queries -----------------------------------------------------------------------

    @property
    def records(self) -> dict[str, ClaimRecord]:
        return dict(self._checkpoint.claims)

    @property
    def ledger(self) -> Ledger:
        """A copy of what the prepared claims hold, as the allocator books it."""
        with self._ledger:
            return self._book.copy()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

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
        remove_leftovers(self.checkpoint_path.parent, self.checkpoint_path.name)
        loaded = checkpoint.load(self.checkpoint_path)
        claims: dict[str, ClaimRecord] = {}
        if loaded is not None:
            if loaded.boot_id and loaded.boot_id != self._boot_id:
                log.warning("the node rebooted since the checkpoint was written (boot id %s, "
                            "now %s): %d preparations are void", loaded.boot_id,
                            self._boot_id, len(loaded.claims))
            else:
                claims = dict(loaded.claims)
            self._checkpoint = replace(loaded, boot_id=self._boot_id, claims={})
        self._book = Ledger()  # rebuilt by the save below, from the claims that stay
        for uid, record in list(claims.items()):
            if record.state == "PrepareCompleted":
                continue
            with claim_context(uid):
                log.info("rolling back %s of ResourceClaim %s/%s", record.state,
                         record.namespace, record.name)
                problems = self._teardown(uid, record.devices)
            if problems:
                log.error("cannot roll back ResourceClaim %s/%s (%s): %s; kept for the next "
                          "start", record.namespace, record.name, uid, "; ".join(problems))
            else:
                del claims[uid]
        self._save(claims)
        for uid, record in claims.items():
            if record.state == "PrepareCompleted" and not (
                    self.cdi_root / cdi.spec_file_name(self.driver, uid)).exists():
                with claim_context(uid):
                    log.warning("CDI spec of prepared ResourceClaim %s/%s is missing; "
                                "writing it again", record.namespace, record.name)
                    try:
                        self._write_spec(uid, record.devices)
                    except (ClaimError, OSError) as err:  # e.g. its GPU is gone
                        log.error("cannot write the CDI spec again: %s", err)
        if self.dynamic_mig:
            self._sweep_mig(claims.values())
        for uid, path in cdi.claim_specs(self.cdi_root, self.driver).items():
            if uid not in claims:
                log.info("removing the CDI spec of a claim that is not prepared: %s", path)
                cdi.remove_spec(self.cdi_root, self.driver, uid)

    def _sweep_mig(self, records: Iterable[ClaimRecord]) -> None:
        """Dynamic MIG owns the MIG devices: any the records do not explain is destroyed,
        so the free placements are what the published slices promise."""
        wanted = {(d.gpu_uuid, d.created_mig.profile_id, d.created_mig.start)
                  for r in records for d in r.devices if d.created_mig is not None}
        for gpu in self.inventory.gpus:
            if not gpu.mig_profiles:  # MIG mode may have changed since discovery
                continue
            try:
                for live in self.mig.live(gpu):
                    if (gpu.uuid, live.profile_id, live.start) not in wanted:
                        log.warning("destroying MIG GPU instance %d on %s that no prepared "
                                    "claim holds", live.gi_id, gpu.uuid)
                        self.mig.destroy(gpu.uuid, live.profile_id, live.start)
            except MigFailure as err:  # e.g. in use: a claim that needs it fails cleanly
                log.error("%s", err)

    # -- prepare -----------------------------------------------------------------------

    def prepare(self, refs: Sequence[ClaimRef], deadline: float) -> dict[str, Outcome]:
        outcomes, unique = self._admit(refs)
        with self._claim_locks.hold(unique, deadline) as held:
            for uid in unique.keys() - held:
                outcomes[uid] = _failed("busy", "another call is working on this claim")
            mine = [unique[uid] for uid in sorted(held)]
            to_fetch = [ref for ref in mine if not self._prepared(ref.uid)]
            fetched = dict(zip((ref.uid for ref in to_fetch),
                               self._parallel(self._fetch, to_fetch), strict=True))
            self._serialized(held, outcomes, deadline, lambda: self._prepare_held(
                mine, fetched, outcomes, deadline))
        for outcome in outcomes.values():
            self.metrics.claim_done("prepare", outcome.reason if outcome.error else None)
        return outcomes

    def _serialized(self, uids: set[str], outcomes: dict[str, Outcome], deadline: float,
                    work: Callable[[], None]) -> None:
        """Run `work` under the node lock, if there is any; if the lock or the checkpoint
        another process wrote cannot be had, every claim of the call fails with the
        reason."""
        if not uids:
            return
        try:
            with self._node_lock.hold(deadline):
                work()
        except LockTimeout as err:
            for uid in uids:
                outcomes[uid] = _failed("busy", str(err))
        except (LockFailure, CheckpointError) as err:
            log.error("%s", err)
            for uid in uids:
                outcomes[uid] = _failed("internal", str(err))

    def _prepared(self, uid: str) -> bool:
        record = self._checkpoint.claims.get(uid)
        return record is not None and record.state == "PrepareCompleted"

    def _fetch(self, ref: ClaimRef) -> dict[str, Any] | Exception:
        """The claim from its source, or why not (raised again by `_plan` if the claim
        still needs it once the node lock is held)."""
        with claim_context(ref.uid):
            try:
                return self.claims.get(ref)
            except Exception as err:  # ClaimError, or a bug: _plan answers it
                return err

    def _prepare_held(self, refs: list[ClaimRef], fetched: Mapping[str, Any],
                      outcomes: dict[str, Outcome], deadline: float) -> None:
        plans: list[_Plan] = []
        for plan in self._parallel(lambda ref: self._plan(ref, fetched), refs):
            if isinstance(plan, _Plan):
                plans.append(plan)
            else:
                uid, outcome = plan
                outcomes[uid] = outcome
        accepted = self._start(plans, outcomes)
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
        return list(self._pool.map(fn, items))

    def _plan(self, ref: ClaimRef, fetched: Mapping[str, Any]
              ) -> _Plan | tuple[str, Outcome]:
        with claim_context(ref.uid):
            record = self._checkpoint.claims.get(ref.uid)
            if record is not None and record.state != "PrepareCompleted":
                problems = self._roll_back_stale(record)
                if problems:
                    return ref.uid, _failed("device_error", f"ResourceClaim {ref} was left "
                                            f"{record.state}: rolling it back failed: "
                                            f"{'; '.join(problems)}")
                record = None
            try:
                if record is not None:
                    if not (self.cdi_root / cdi.spec_file_name(self.driver, ref.uid)).exists():
                        self._write_spec(ref.uid, record.devices)
                    log.debug("ResourceClaim %s is already prepared", ref)
                    return ref.uid, Outcome(devices=record.devices)
                # not fetched: it was prepared before this process took the lock
                claim = fetched[ref.uid] if ref.uid in fetched else self.claims.get(ref)
                if isinstance(claim, Exception):
                    raise claim
                allocation = claim_allocation(claim, self.driver, self.pool)
                devices = tuple(self._planned(ref, result, allocation.configs)
                                for result in allocation.devices)
            except ClaimError as err:
                log.info("cannot prepare ResourceClaim %s: %s", ref, err)
                return ref.uid, _failed(err.reason, str(err))
            except Exception as err:  # a bug must fail this claim, not the call
                log.exception("preparing ResourceClaim %s failed", ref)
                return ref.uid, _failed("internal", f"internal error: {err!r}")
            return _Plan(ref, devices)

    def _roll_back_stale(self, record: ClaimRecord) -> list[str]:
        """Undo a record a dead process left half-done (this call holds the claim's lock
        and the node lock, so nobody else is working on it) and forget it."""
        log.warning("ResourceClaim %s/%s was left %s by a plugin process that stopped; "
                    "rolling it back", record.namespace, record.name, record.state)
        problems = self._teardown(record.uid, record.devices)
        if problems:
            return problems
        with self._ledger:
            claims = dict(self._checkpoint.claims)
            claims.pop(record.uid, None)
            try:
                self._save(claims)
            except OSError as err:
                return [f"cannot write the checkpoint: {err}"]
        return []

    def _planned(self, ref: ClaimRef, result: AllocatedDevice,
                 configs: Sequence[OpaqueConfig]) -> PreparedDevice:
        target = self.index.get(result.device)
        if target is None:
            raise ClaimError("unknown_device", f"device {result.device} (request "
                                               f"{result.request}) is not published by "
                                               f"this node")
        chosen = config_for(configs, result.request)
        expected = GpuConfig if target.kind == "gpu" else MigDeviceConfig
        if chosen is not None and not isinstance(chosen.config, expected):
            raise ClaimError("bad_config", f"status.allocation.devices.config[{chosen.index}]:"
                                           f" a {chosen.config.kind} does not apply to "
                                           f"{target.kind} device {result.device} (request "
                                           f"{result.request}); use {expected.__name__}")
        created = None
        if target.dynamic_profile is not None:
            if result.admin_access:
                raise ClaimError("bad_request", f"device {result.device}: adminAccess to a "
                                                "dynamic MIG device is not supported")
            assert target.placement is not None
            created = MigInstance(target.dynamic_profile.id, target.placement.start,
                                  target.placement.size)
        config = chosen.config if chosen is not None else None
        timeslice = None  # an adminAccess user does not own the GPU's settings
        if isinstance(config, GpuConfig) and config.sharing is not None and \
                not result.admin_access:
            timeslice = config.sharing.timeslice
        return PreparedDevice(
            request_names=(result.base_request,), pool=result.pool, device=result.device,
            cdi_device_ids=(cdi.qualified_name(self.driver,
                                               cdi.device_name(ref.uid, result.device)),),
            gpu_uuid=target.gpu.uuid, admin_access=result.admin_access,
            share_id=result.share_id, created_mig=created, timeslice=timeslice,
            config=config.model_dump(exclude_none=True) if config is not None else None)

    def _start(self, plans: list[_Plan], outcomes: dict[str, Outcome]) -> list[_Plan]:
        """Refuse plans whose devices or counters other claims hold; record the rest as
        started (each accepted plan holds its devices for the ones after it)."""
        with self._ledger:
            claims = dict(self._checkpoint.claims)
            accepted = []
            for plan in plans:
                key = ledger_key(plan.ref.namespace, plan.ref.name, plan.ref.uid)
                results = self._results(plan.devices)
                problems = prepare_conflicts(self._book, key, results, self.pools)
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    message = f"cannot prepare ResourceClaim {plan.ref}: {problems[0]}{more}"
                    with claim_context(plan.ref.uid):
                        log.warning("%s", message)
                    outcomes[plan.ref.uid] = _failed("in_use", message)
                    continue
                accepted.append(plan)
                self._book.add(key, results)
                claims[plan.ref.uid] = ClaimRecord(plan.ref.uid, plan.ref.namespace,
                                                   plan.ref.name, "PrepareStarted", plan.devices)
            if not accepted:
                return []
            try:
                self._save(claims)
            except OSError as err:
                self._sync_book(claims, self._checkpoint.claims)
                for plan in accepted:
                    outcomes[plan.ref.uid] = _failed("internal", f"cannot write the checkpoint:"
                                                                 f" {err}")
                return []
            return accepted

    def _results(self, devices: Iterable[PreparedDevice]) -> list[dict[str, Any]]:
        """Prepared devices as the allocation results they came from."""
        results = []
        for device in devices:
            result: dict[str, Any] = {"request": device.request_names[0] if
                                      device.request_names else "", "driver": self.driver,
                                      "pool": device.pool, "device": device.device}
            if device.admin_access:
                result["adminAccess"] = True
            if device.share_id is not None:
                result["shareID"] = device.share_id
            results.append(result)
        return results

    def _act(self, plan: _Plan, deadline: float) -> Outcome:
        uid = plan.ref.uid
        started = time.monotonic()
        with claim_context(uid):
            if started > deadline:
                return _failed("timeout", "the kubelet's deadline passed before this claim's "
                                          "turn; it will retry")
            done: list[PreparedDevice] = []
            try:
                created: dict[str, MigInstance] = {}
                for device in plan.devices:
                    target = self.index[device.device]
                    if self.dynamic_mig and target.kind == "gpu" and target.gpu.mig_profiles \
                            and not device.admin_access:  # its partitions are free (counters)
                        self.mig.disable(target.gpu)
                    if device.created_mig is not None and device.device not in created:
                        assert target.dynamic_profile is not None and target.placement
                        made = self.mig.create(target.gpu, target.dynamic_profile,
                                               target.placement)
                        created[device.device] = replace(device.created_mig, gi_id=made.gi_id,
                                                         ci_id=made.ci_id)
                    if device.created_mig is not None:
                        device = replace(device, created_mig=created[device.device])
                    if device.timeslice is not None:
                        self.timeslicer.set(device.gpu_uuid, device.timeslice)
                    done.append(device)
                    if device.config is not None and device.config.get("sharing", {}).get(
                            "strategy") == "MPS":
                        log.warning("device %s: MPS settings are validated and recorded; this "
                                    "version does not start an MPS control daemon",
                                    device.device)
                self._write_spec(uid, done)
            except Exception as err:  # expected: MigFailure, SharingFailure, OSError, ClaimError
                log.error("preparing ResourceClaim %s failed: %s; rolling back", plan.ref, err,
                          exc_info=not isinstance(err, MigFailure | SharingFailure | OSError |
                                                  ClaimError))
                problems = self._teardown(uid, done)
                message = str(err) if not problems else \
                    f"{err}; rollback also failed: {'; '.join(problems)}"
                return _failed(err.reason if isinstance(err, DriverError) else "device_error",
                               message)
            self.metrics.claim_latency.labels("prepare").observe(time.monotonic() - started)
            log.info("prepared ResourceClaim %s: %s", plan.ref,
                     ", ".join(d.device for d in done) or "no devices of this driver")
            return Outcome(devices=tuple(done))

    def _finish(self, plans: list[_Plan], acted: list[Outcome],
                outcomes: dict[str, Outcome]) -> None:
        if not plans:
            return
        with self._ledger:
            claims = dict(self._checkpoint.claims)
            for plan, outcome in zip(plans, acted, strict=True):
                outcomes[plan.ref.uid] = outcome
                if outcome.error is None:
                    claims[plan.ref.uid] = claims[plan.ref.uid].with_state("PrepareCompleted",
                                                                           outcome.devices)
                else:
                    del claims[plan.ref.uid]
            try:
                self._save(claims)
            except OSError as err:
                self._abandon(plans, acted, outcomes, err)

    def _abandon(self, plans: list[_Plan], acted: list[Outcome], outcomes: dict[str, Outcome],
                 err: OSError) -> None:
        """The checkpoint cannot be written: undo the batch; its PrepareStarted records on
        disk make the next start finish any undo that fails here."""
        for plan, outcome in zip(plans, acted, strict=True):
            if outcome.error is None:
                with claim_context(plan.ref.uid):
                    self._teardown(plan.ref.uid, outcome.devices)
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
        return outcomes

    def _unprepare_held(self, uids: set[str], outcomes: dict[str, Outcome]) -> None:
        records = self._begin_unprepare(uids, outcomes)
        results = self._parallel(self._unprepare_one, list(records.values()))
        self._end_unprepare(records, results, outcomes)
        for uid in uids - records.keys() - outcomes.keys():
            cdi.remove_spec(self.cdi_root, self.driver, uid)  # unknown: nothing to undo
            outcomes[uid] = Outcome()

    def _begin_unprepare(self, uids: set[str], outcomes: dict[str, Outcome]
                         ) -> dict[str, ClaimRecord]:
        with self._ledger:
            claims = dict(self._checkpoint.claims)
            records = {uid: claims[uid].with_state("UnprepareStarted")
                       for uid in uids if uid in claims}
            if not records:
                return {}
            claims.update(records)
            try:
                self._save(claims)
            except OSError as err:
                for uid in records:
                    outcomes[uid] = _failed("internal", f"cannot write the checkpoint: {err}")
                return {}
            return records

    def _unprepare_one(self, record: ClaimRecord) -> list[str]:
        started = time.monotonic()
        with claim_context(record.uid):
            problems = self._teardown(record.uid, record.devices)
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
        with self._ledger:
            claims = dict(self._checkpoint.claims)
            for uid, problems in zip(records, results, strict=True):
                if problems:
                    outcomes[uid] = _failed("device_error", "; ".join(problems))
                else:
                    del claims[uid]
                    outcomes[uid] = Outcome()
            try:
                self._save(claims)
            except OSError as err:  # the records stay UnprepareStarted on disk: redone at start
                for uid in records:
                    outcomes[uid] = _failed("internal", f"cannot write the checkpoint: {err}")

    # -- shared ------------------------------------------------------------------------

    def _teardown(self, uid: str, devices: Iterable[PreparedDevice]) -> list[str]:
        """Undo a claim's devices (MIG devices it created, time slices it set) and remove its
        spec; every step is tried, and each failure is returned."""
        problems = []
        for device in devices:
            try:
                if device.created_mig is not None:
                    self.mig.destroy(device.gpu_uuid, device.created_mig.profile_id,
                                     device.created_mig.start)
                if device.timeslice is not None:
                    self.timeslicer.set(device.gpu_uuid, "Default")
            except (MigFailure, SharingFailure) as err:
                problems.append(str(err))
        try:
            cdi.remove_spec(self.cdi_root, self.driver, uid)
        except OSError as err:
            problems.append(f"cannot remove the CDI spec: {err}")
        return problems

    def _write_spec(self, uid: str, devices: Sequence[PreparedDevice]) -> None:
        specs: dict[str, cdi.CdiDevice] = {}
        for device in devices:
            if device.device not in specs:
                specs[device.device] = cdi.CdiDevice(cdi.device_name(uid, device.device),
                                                     self._nodes(device))
        spec = cdi.build_spec(self.driver, list(specs.values()), self.files)
        cdi.write_spec(self.cdi_root, self.driver, uid, spec)

    def _nodes(self, device: PreparedDevice) -> tuple[DeviceNode, ...]:
        target = self.index.get(device.device)
        if target is None:
            raise ClaimError("unknown_device", f"device {device.device} is no longer "
                                               "published by this node")
        gpu = target.gpu
        if target.placement is None:
            return (self.devices.gpu_node(gpu),)
        if target.static_mig is not None:
            mig = target.static_mig
            minors = None if mig.gi_cap_minor is None or mig.ci_cap_minor is None else \
                (mig.gi_cap_minor, mig.ci_cap_minor)
        else:
            made = device.created_mig
            assert made is not None and made.gi_id is not None and made.ci_id is not None
            minors = self.host.mig_minors(gpu.minor, made.gi_id, made.ci_id)
        if minors is None:
            raise ClaimError("device_error", f"device {device.device}: the /dev/nvidia-caps "
                                             "minors of its MIG instance are unknown "
                                             "(/proc/driver/nvidia/capabilities)")
        return self.devices.mig_nodes(gpu, minors)

    def _save(self, claims: dict[str, ClaimRecord]) -> None:
        updated = self._checkpoint.with_claims(claims)
        checkpoint.save(self.checkpoint_path, updated)
        self._adopt(updated)

    def _adopt(self, updated: Checkpoint) -> None:
        self._sync_book(self._checkpoint.claims, updated.claims)
        self._checkpoint = updated
        self.metrics.prepared.set(sum(r.state == "PrepareCompleted"
                                      for r in updated.claims.values()))

    def _sync_book(self, old: Mapping[str, ClaimRecord], new: Mapping[str, ClaimRecord]
                   ) -> None:
        """Make the ledger hold `new`'s claims where it held `old`'s."""
        for uid, record in old.items():
            if uid not in new or _record_key(new[uid]) != _record_key(record):
                self._book.remove(_record_key(record))
        for uid, record in new.items():
            before = old.get(uid)
            if before is None or before.devices != record.devices or \
                    _record_key(before) != _record_key(record):
                self._book.add(_record_key(record), self._results(record.devices))

    def _reload(self) -> None:
        """Read the checkpoint again (run when this process takes the node lock: the other
        process may have written it since); a few KB, so always."""
        try:
            loaded = checkpoint.load(self.checkpoint_path)
        except (OSError, ValueError) as err:  # ValueError: UnicodeDecodeError too
            raise CheckpointError(f"checkpoint {self.checkpoint_path}: cannot read it: "
                                  f"{err}") from None
        if loaded is None:
            return
        with self._ledger:
            self._adopt(replace(loaded, boot_id=self._boot_id))
        log.debug("read the checkpoint again: %d claims", len(loaded.claims))
