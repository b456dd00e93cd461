"""The plugin's records of its claims: the checkpoint and the ledger, kept in step.

The checkpoint (`checkpoint`) is what survives the process: every claim prepared or half
done on this node, by UID. The ledger is the allocator's own bookkeeping (`Ledger`) of
what those claims hold, checked with `prepare_conflicts` against the pools this plugin
publishes, so a claim is refused the devices and shared counters another claim holds.
`Records` reads as the checkpoint's claims by UID; `lock` guards every change, and each
save or reload brings the ledger in step with the claims it writes or reads.

A record also holds the time slices its devices set (each device's GPU and interval, in
the checkpoint already): a claim asking for another interval on such a GPU is refused
(`timeslice_conflicts`), and an undo leaves the time slice while another claim holds it
(`timeslices_held`), across restarts as the records are.

Every record holds its devices, whatever its state: one a failed rollback left (MIG
devices created, so with their ids, in a PrepareStarted record) keeps its placement from
other claims and is named in their refusal; two records a checkpoint gives one device
(a bug, or a hand edit) are reported at start and both keep it.

A save costs what it changes, not what is held: it appends the changed records to the
checkpoint's journal (`journal`), and the ledger, the gauge of prepared claims and the
records change for those records only. The snapshot is written whole (a compaction) at
start, when the journal outgrows it (so a save's share of it stays constant), and
whenever this process lets the node lock go (`compact`, the lock's on_release): another
process waits for it, or this one stops. The lock is kept with no call in flight while
the journal holds saves the snapshot lacks (`lagging`), so whoever takes it next finds
every claim in the snapshot, a release that reads no journal too (a rolling update
either way, or a graceful downgrade). The one case this cannot cover: this process
killed (SIGKILL, OOM, a node crash) with saves in the journal only, then a release that
reads no journal started before this release starts again: that release misses the
claims of those saves, and removes their CDI specs and, in dynamic MIG mode, their MIG
devices. When the node lock is taken, the checkpoint is read again only if a file
changed since this process last wrote or read it (`checkpoint.file_id`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from driver.allocator import Ledger, Node, prepare_conflicts
from driver.allocator.pools import gather_pools
from driver.atomicfile import remove_leftovers
from driver.plugin import checkpoint, journal
from driver.plugin.checkpoint import (
    Checkpoint,
    ClaimRecord,
    FileId,
    PreparedDevice,
    claim_to_json,
    file_id,
    stat_id,
)
from driver.plugin.claims import ClaimRef
from driver.plugin.journal import Journal, Replay
from driver.plugin.metrics import Metrics
from driver.plugin.node import Identity

log = logging.getLogger(__name__)

# A journal compacts past this size, or past the snapshot's if larger: a start reads up to
# it (about 22 ms), and a compaction (4 flushes) comes every 90 or so prepare/unprepare
# rounds of an 8-GPU claim (6 KB of lines), not every 11 as at 64 KiB.
COMPACT_AT = 512 << 10
Changes = Mapping[str, ClaimRecord | None]
"""Records to save, by claim UID; None removes the claim's record."""


def ledger_key(namespace: str, name: str, uid: str) -> str:
    """A claim in the ledger, as conflict messages name it: by UID too, since a claim
    deleted and created again under its name is another claim."""
    return f"ResourceClaim {namespace}/{name} ({uid})"


def _record_key(record: ClaimRecord) -> str:
    """The claim's ledger key; for a record of what a failed rollback left, with the MIG
    devices left named, so that a claim refused their placement learns what holds it."""
    key = ledger_key(record.namespace, record.name, record.uid)
    if record.state != "PrepareStarted":
        return key
    left = [f"{d.device} (GPU instance {d.created_mig.gi_id} of profile "
            f"{d.created_mig.profile_id} at {d.created_mig.start} on {d.gpu_uuid})"
            for d in record.devices
            if d.created_mig is not None and d.created_mig.gi_id is not None]
    return key if not left else f"{key}, whose failed rollback left {', '.join(left)}"


def timeslices_held(records: Iterable[ClaimRecord], gpu_uuid: str, besides: str
                    ) -> dict[str, str]:
    """The time slices claims other than `besides` hold on the GPU: interval by the claim's
    ledger key. A record being unprepared holds none: its undo puts the GPU's back unless
    another claim holds it, so two claims unprepared together both put it back."""
    held = {}
    for record in records:
        if record.uid == besides or record.state == "UnprepareStarted":
            continue
        for device in record.devices:
            if device.gpu_uuid == gpu_uuid and device.timeslice is not None:
                held[_record_key(record)] = device.timeslice
    return held


def timeslice_conflicts(ref: ClaimRef, devices: Sequence[PreparedDevice],
                        records: Iterable[ClaimRecord]) -> list[str]:
    """A GPU has one time slice: a claim that asks for an interval other than the one a
    claim holding the GPU set (or than another of its own devices on that GPU asks for) is
    refused, as a device another claim holds is; asking for the same interval shares it."""
    wanted: dict[str, PreparedDevice] = {}
    problems = []
    for device in devices:
        if device.timeslice is None:
            continue
        first = wanted.setdefault(device.gpu_uuid, device)
        if first.timeslice != device.timeslice:
            problems.append(f"devices {first.device} and {device.device} ask for time slices "
                            f"{first.timeslice} and {device.timeslice} of one GPU "
                            f"{device.gpu_uuid}, which has one time slice")
    records = list(records) if wanted else []
    for gpu_uuid, device in wanted.items():
        for key, interval in timeslices_held(records, gpu_uuid, ref.uid).items():
            if interval != device.timeslice:
                problems.append(f"device {device.device} asks for time slice "
                                f"{device.timeslice}, but its GPU {gpu_uuid} has time slice "
                                f"{interval} for {key}: a GPU has one time slice, kept until "
                                "the last claim that set it is unprepared")
    return problems


class Records(Mapping[str, ClaimRecord]):
    """The checkpoint's claims by UID, as this process last wrote or read them, and the
    ledger of what they hold. Change them only under `lock`."""

    def __init__(self, identity: Identity, path: Path, slices: Sequence[Mapping[str, Any]],
                 metrics: Metrics) -> None:
        self.lock = threading.Lock()
        self.path = path
        self._journal = Journal(journal.path_for(path))
        self._driver = identity.driver
        self._boot_id = identity.boot_id
        self._metrics = metrics
        self._node = Node(identity.node)
        # What this plugin publishes: its devices and the counters they consume.
        self._published_pools = gather_pools(slices, self._node)
        # The checkpoint's top level (boot id, fields of other versions); its claims are
        # `_claims`, changed in place.
        self._top = Checkpoint(boot_id=identity.boot_id)
        self._claims: dict[str, ClaimRecord] = {}
        self._completed = 0  # how many records are PrepareCompleted
        self._ledger = Ledger()  # the allocation results of every claim in the checkpoint
        # What `take` booked for a claim with no record yet, by UID (its ledger key and
        # devices): the save of that record finds the ledger in step already.
        self._taken: dict[str, tuple[str, Sequence[PreparedDevice]]] = {}
        self._snapshot_size = 0
        self._lagging = False  # the journal holds saves the snapshot lacks
        # The snapshot and the journal as this process last wrote or read them.
        self._seen: tuple[FileId | None, FileId | None] = (None, None)

    # -- reading -----------------------------------------------------------------------

    def __getitem__(self, uid: str) -> ClaimRecord:
        return self._claims[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._claims))  # a copy: saves change the dict in place

    def __len__(self) -> int:
        return len(self._claims)

    def prepared(self, uid: str) -> bool:
        record = self._claims.get(uid)
        return record is not None and record.state == "PrepareCompleted"

    @property
    def ledger(self) -> Ledger:
        """A copy of what the prepared claims hold, as the allocator books it."""
        with self.lock:
            return self._ledger.copy()

    @property
    def lagging(self) -> bool:
        """The snapshot lacks saves the journal holds (a reader of it alone misses them)."""
        return self._lagging

    def timeslices_held(self, gpu_uuid: str, besides: str) -> dict[str, str]:
        """`timeslices_held` over the records now (safe without `lock`: a copy is read)."""
        return timeslices_held(list(self._claims.values()), gpu_uuid, besides)

    # -- the ledger (under `lock`) ------------------------------------------------------

    def publish(self, slices: Sequence[Mapping[str, Any]]) -> None:
        """Check conflicts against these slices from now on (a re-discovery changed them)."""
        self._published_pools = gather_pools(slices, self._node)

    def take(self, ref: ClaimRef, devices: Sequence[PreparedDevice],
             pending: Iterable[ClaimRecord] = ()) -> list[str]:
        """Book the devices for the claim unless other claims hold them or their counters
        (adminAccess is exempt), or their GPUs' time slices are set to other intervals by
        the records or the `pending` ones (taken, not saved yet); the conflicts, and
        nothing booked, if so."""
        key = ledger_key(ref.namespace, ref.name, ref.uid)
        results = self._results(devices)
        problems = prepare_conflicts(self._ledger, key, results, self._published_pools) or \
            timeslice_conflicts(ref, devices, [*self._claims.values(), *pending])
        if not problems:
            self._ledger.add(key, results)
            self._taken[ref.uid] = (key, devices)
        return problems

    def forget_unsaved(self, changes: Changes) -> None:
        """After `changes` could not be saved: the ledger, booked for them, back to what
        the records hold."""
        for uid, record in changes.items():
            self._taken.pop(uid, None)
            self._book(record, self._claims.get(uid))

    # -- the checkpoint ----------------------------------------------------------------

    def load(self) -> dict[str, ClaimRecord] | None:
        """At start: the claims the checkpoint on disk holds (none if the node rebooted
        since it was written), None if there is no checkpoint; the records hold none until
        `save_all`."""
        remove_leftovers(self.path.parent, self.path.name)
        found = checkpoint.read(self.path, self._boot_id)
        self._claims, self._ledger = {}, Ledger()  # `save_all` books the claims that stay
        if found is None:
            return None
        self._report_ignored(found.replay)
        loaded = found.checkpoint
        claims: dict[str, ClaimRecord] = {}
        if loaded.boot_id and loaded.boot_id != self._boot_id:
            log.warning("the node rebooted since the checkpoint was written (boot id %s, "
                        "now %s): %d preparations are void", loaded.boot_id,
                        self._boot_id, len(loaded.claims))
        else:
            claims = dict(loaded.claims)
            self._report_double_booking(claims.values())
        self._top = replace(loaded, boot_id=self._boot_id, claims={})
        return claims

    def save_all(self, claims: dict[str, ClaimRecord]) -> None:
        """Write the checkpoint with exactly `claims` (a compaction), then hold them; OSError
        if it cannot be written (the records stay as they were)."""
        self._compact(claims)
        self._adopt(claims)

    def save(self, changes: Changes, durable: bool = True) -> None:
        """Write the changed records (None: removed), then hold them; OSError if they cannot
        be written (the records stay as they were). Not `durable`: written for every
        process to read, flushed to disk by the next durable save (a compaction is always
        durable)."""
        if not changes:
            return
        changed = {uid: r for uid, r in changes.items() if r is not None}
        line = journal.entry({uid: claim_to_json(r) for uid, r in changed.items()},
                             [uid for uid, r in changes.items() if r is None])
        end = self._journal.end
        if end is not None and end + len(line) <= max(COMPACT_AT, self._snapshot_size) and \
                (file_id(self.path), file_id(self._journal.path)) == self._seen:
            self._seen = (self._seen[0], stat_id(self._journal.append(line, durable)))
            self._lagging = True
        else:  # due, or a file changed under the lock (removed with the data dir?)
            claims = {**self._claims, **changed}
            for uid in changes.keys() - changed.keys():
                claims.pop(uid, None)
            self._compact(claims)
        for uid, record in changes.items():
            self._change(uid, record)
        self._metrics.prepared.set(self._completed)

    def compact(self) -> None:
        """Write every claim into the snapshot if the journal holds saves it lacks: run
        before the node lock goes to another process, which may read the snapshot alone."""
        with self.lock:
            if not self._lagging:
                return
            try:
                self._compact(self._claims)
            except OSError as err:
                log.error("checkpoint %s: cannot write every claim into it (%s); until it "
                          "can, a plugin release that reads no journal misses the latest "
                          "changes", self.path, err)

    def _compact(self, claims: dict[str, ClaimRecord]) -> None:
        """The snapshot with `claims`, then a fresh journal. Once the snapshot is written the
        old journal is stale (it names the old snapshot's bytes), so a failure after that
        only makes the next save compact again."""
        data = checkpoint.save(self.path, self._top.with_claims(claims))
        self._snapshot_size, self._lagging = len(data), False
        try:
            self._seen = (file_id(self.path), stat_id(self._journal.reset(data)))
        except OSError as err:
            self._seen = (None, None)
            log.warning("checkpoint %s: wrote it, but not a fresh journal (%s); the next "
                        "save writes the checkpoint whole again", self.path, err)

    def _report_ignored(self, replay: Replay) -> None:
        if replay.ignored:
            what = "a last line cut off by a kill (its save never completed)" \
                if replay.end is not None else "it extends other checkpoint bytes: the " \
                "checkpoint was written since (by a compaction cut off before it replaced " \
                "the journal, by a release that reads no journal, or by hand) and holds " \
                "what those knew"
            log.warning("checkpoint %s: ignoring %d line(s) of its journal: %s", self.path,
                        replay.ignored, what)

    def _report_double_booking(self, records: Iterable[ClaimRecord]) -> None:
        """Log each record that holds what an earlier one does (they all stay, and the
        ledger books the device for each, so no new claim gets it)."""
        ledger = Ledger()
        for record in records:
            key, results = _record_key(record), self._results(record.devices)
            for problem in prepare_conflicts(ledger, key, results, self._published_pools):
                log.error("checkpoint %s: %s holds what another record holds: %s; both "
                          "records are kept, and no other claim gets the device until they "
                          "are unprepared", self.path, key, problem)
            ledger.add(key, results)

    def reload(self) -> None:
        """Read the checkpoint again if a file changed since this process last wrote or
        read it (run when this process takes the node lock: the other process may have
        written it since)."""
        seen = (file_id(self.path), file_id(self._journal.path))
        if seen == self._seen:
            return
        found = checkpoint.read(self.path)  # CheckpointError names the file and the problem
        if found is None:
            return
        self._report_ignored(found.replay)
        with self.lock:
            self._top = replace(found.checkpoint, boot_id=self._boot_id, claims={})
            self._adopt(dict(found.checkpoint.claims))
            self._journal.end = found.replay.end
            self._snapshot_size = found.snapshot_size
            self._lagging = bool(found.replay.saves)
            self._seen = seen
        log.debug("read the checkpoint again: %d claims", len(self._claims))

    def _adopt(self, claims: dict[str, ClaimRecord]) -> None:
        """Hold `claims` instead of the records held (all of them: at start and after
        another process wrote the checkpoint)."""
        for uid in self._claims.keys() | claims.keys():
            self._book(self._claims.get(uid), claims.get(uid))
        self._claims = claims
        self._completed = sum(r.state == "PrepareCompleted" for r in claims.values())
        self._metrics.prepared.set(self._completed)

    def _change(self, uid: str, record: ClaimRecord | None) -> None:
        """Hold `record` (None: no record) for the claim, in the ledger and the count too."""
        before = self._claims.get(uid)
        taken = self._taken.pop(uid, None)
        if before is not None or record is None or taken is None or \
                taken != (_record_key(record), record.devices):
            self._book(before, record)
        self._completed += (record is not None and record.state == "PrepareCompleted") - \
            (before is not None and before.state == "PrepareCompleted")
        if record is None:
            self._claims.pop(uid, None)
        else:
            self._claims[uid] = record

    def _book(self, old: ClaimRecord | None, new: ClaimRecord | None) -> None:
        """Make the ledger hold one claim's `new` record where it held `old`."""
        if old is not None and (new is None or _record_key(new) != _record_key(old)):
            self._ledger.remove(_record_key(old))
        if new is not None and (old is None or old.devices != new.devices or
                                _record_key(old) != _record_key(new)):
            self._ledger.add(_record_key(new), self._results(new.devices))

    def _results(self, devices: Iterable[PreparedDevice]) -> list[dict[str, Any]]:
        """Prepared devices as the allocation results they came from."""
        results = []
        for device in devices:
            result: dict[str, Any] = {"request": device.request_names[0] if
                                      device.request_names else "", "driver": self._driver,
                                      "pool": device.pool, "device": device.device}
            if device.admin_access:
                result["adminAccess"] = True
            if device.share_id is not None:
                result["shareID"] = device.share_id
            results.append(result)
        return results
