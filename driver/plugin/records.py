"""The plugin's records of its claims: the checkpoint and the ledger, kept in step.

The checkpoint (`checkpoint`) is what survives the process: every claim prepared or half
done on this node, by UID. The ledger is the allocator's own bookkeeping (`Ledger`) of
what those claims hold, checked with `prepare_conflicts` against the pools this plugin
publishes, so a claim is refused the devices and shared counters another claim holds.
`Records` reads as the checkpoint's claims by UID; `lock` guards every change, and each
save or reload brings the ledger in step with the claims it writes or reads.

Every record holds its devices, whatever its state: one a failed rollback left (MIG
devices created, so with their ids, in a PrepareStarted record) keeps its placement from
other claims and is named in their refusal; two records a checkpoint gives one device
(a bug, or a hand edit) are reported at start and both keep it.
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
from driver.plugin import checkpoint
from driver.plugin.checkpoint import Checkpoint, CheckpointError, ClaimRecord, PreparedDevice
from driver.plugin.claims import ClaimRef
from driver.plugin.metrics import Metrics
from driver.plugin.node import Identity

log = logging.getLogger(__name__)


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


class Records(Mapping[str, ClaimRecord]):
    """The checkpoint's claims by UID, as this process last wrote or read them, and the
    ledger of what they hold. Change them only under `lock`."""

    def __init__(self, identity: Identity, path: Path, slices: Sequence[Mapping[str, Any]],
                 metrics: Metrics) -> None:
        self.lock = threading.Lock()
        self.path = path
        self._driver = identity.driver
        self._boot_id = identity.boot_id
        self._metrics = metrics
        # What this plugin publishes: its devices and the counters they consume.
        self._published_pools = gather_pools(slices, Node(identity.node))
        self._checkpoint = Checkpoint(boot_id=identity.boot_id)
        self._ledger = Ledger()  # the allocation results of every claim in the checkpoint

    # -- reading -----------------------------------------------------------------------

    def __getitem__(self, uid: str) -> ClaimRecord:
        return self._checkpoint.claims[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._checkpoint.claims)

    def __len__(self) -> int:
        return len(self._checkpoint.claims)

    def copy(self) -> dict[str, ClaimRecord]:
        """The claims as one consistent dict, to change and `save`."""
        return dict(self._checkpoint.claims)

    def prepared(self, uid: str) -> bool:
        record = self._checkpoint.claims.get(uid)
        return record is not None and record.state == "PrepareCompleted"

    @property
    def ledger(self) -> Ledger:
        """A copy of what the prepared claims hold, as the allocator books it."""
        with self.lock:
            return self._ledger.copy()

    # -- the ledger (under `lock`) ------------------------------------------------------

    def take(self, ref: ClaimRef, devices: Iterable[PreparedDevice]) -> list[str]:
        """Book the devices for the claim unless other claims hold them or their counters
        (adminAccess is exempt); the conflicts, and nothing booked, if they do."""
        key = ledger_key(ref.namespace, ref.name, ref.uid)
        results = self._results(devices)
        problems = prepare_conflicts(self._ledger, key, results, self._published_pools)
        if not problems:
            self._ledger.add(key, results)
        return problems

    def forget_unsaved(self, claims: Mapping[str, ClaimRecord]) -> None:
        """After `claims` could not be saved: the ledger, booked for them, back to what
        the checkpoint holds."""
        self._sync_ledger(claims, self._checkpoint.claims)

    # -- the checkpoint ----------------------------------------------------------------

    def load(self) -> dict[str, ClaimRecord] | None:
        """At start: the claims the checkpoint on disk holds (none if the node rebooted
        since it was written), None if there is no checkpoint; the records hold none until
        the next `save`."""
        remove_leftovers(self.path.parent, self.path.name)
        loaded = checkpoint.load(self.path)
        self._ledger = Ledger()  # rebuilt by the next save, from the claims that stay
        if loaded is None:
            return None
        claims: dict[str, ClaimRecord] = {}
        if loaded.boot_id and loaded.boot_id != self._boot_id:
            log.warning("the node rebooted since the checkpoint was written (boot id %s, "
                        "now %s): %d preparations are void", loaded.boot_id,
                        self._boot_id, len(loaded.claims))
        else:
            claims = dict(loaded.claims)
            self._report_double_booking(claims.values())
        self._checkpoint = replace(loaded, boot_id=self._boot_id, claims={})
        return claims

    def save(self, claims: dict[str, ClaimRecord]) -> None:
        """Write the checkpoint with `claims`, then hold them; OSError if it cannot be
        written (the records stay as they were)."""
        updated = self._checkpoint.with_claims(claims)
        checkpoint.save(self.path, updated)
        self._adopt(updated)

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
        """Read the checkpoint again (run when this process takes the node lock: the other
        process may have written it since); a few KB, so always."""
        try:
            loaded = checkpoint.load(self.path)
        except (OSError, ValueError) as err:  # ValueError: UnicodeDecodeError too
            raise CheckpointError(f"checkpoint {self.path}: cannot read it: {err}") from None
        if loaded is None:
            return
        with self.lock:
            self._adopt(replace(loaded, boot_id=self._boot_id))
        log.debug("read the checkpoint again: %d claims", len(loaded.claims))

    def _adopt(self, updated: Checkpoint) -> None:
        self._sync_ledger(self._checkpoint.claims, updated.claims)
        self._checkpoint = updated
        self._metrics.prepared.set(sum(r.state == "PrepareCompleted"
                                       for r in updated.claims.values()))

    def _sync_ledger(self, old: Mapping[str, ClaimRecord], new: Mapping[str, ClaimRecord]
                     ) -> None:
        """Make the ledger hold `new`'s claims where it held `old`'s."""
        for uid, record in old.items():
            if uid not in new or _record_key(new[uid]) != _record_key(record):
                self._ledger.remove(_record_key(record))
        for uid, record in new.items():
            before = old.get(uid)
            if before is None or before.devices != record.devices or \
                    _record_key(before) != _record_key(record):
                self._ledger.add(_record_key(record), self._results(record.devices))

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
