"""What the node itself says is prepared, for a start that finds no checkpoint.

The checkpoint is the plugin's memory, but losing it (moved away, a wiped plugin data dir)
must not make the next start undo running workloads. Each prepared claim's CDI spec
survives in the CDI directory and names the claim's UID and its devices (`<uid>-<device>`);
a preparation writes its spec last, so a spec means the claim was prepared completely. The
records rebuilt from the specs hold the claims' devices again (the ledger refuses them to
other claims, the MIG sweep keeps their MIG devices) until the kubelet unprepares them.
What a spec does not say (the claim's namespace and name, recorded as `UNKNOWN`, its
requests, adminAccess, time slice and opaque config) comes back when the kubelet prepares
the claim again: its allocation fills the record in (`PluginState._fill_in`). Until then a
device two specs name is held for both (one of them may have had adminAccess).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from driver.plugin import cdi
from driver.plugin.checkpoint import ClaimRecord, PreparedDevice
from driver.plugin.devices import Target

UNKNOWN = "(unknown)"


def rebuilt_records(specs: Mapping[str, Any], driver: str, node: str,
                    index: Mapping[str, Target]) -> tuple[dict[str, ClaimRecord], list[str]]:
    """A PrepareCompleted record per claim spec (claim UID -> the spec as read, None if it
    could not be read), and the problems met: a spec device this node does not publish
    is left out of its record, but the record, and so the spec, stays."""
    records: dict[str, ClaimRecord] = {}
    problems: list[str] = []
    for uid, spec in specs.items():
        devices: list[PreparedDevice] = []
        for name in _device_names(spec):
            device = name.removeprefix(f"{uid}-")
            target = index.get(device) if device != name else None
            if target is None:
                problems.append(f"claim {uid}: CDI device {name!r} is not a device this node "
                                "publishes")
                continue
            devices.append(PreparedDevice(
                request_names=(), pool=node, device=device,
                cdi_device_ids=(cdi.qualified_name(driver, name),), gpu_uuid=target.gpu.uuid,
                created_mig=target.mig_to_create))
        records[uid] = ClaimRecord(uid, UNKNOWN, UNKNOWN, "PrepareCompleted", tuple(devices))
    return records, problems


def _device_names(spec: Any) -> list[str]:
    devices = spec.get("devices") if isinstance(spec, dict) else None
    if not isinstance(devices, list):
        return []
    return [d["name"] for d in devices if isinstance(d, dict) and isinstance(d.get("name"), str)]


def is_rebuilt(record: ClaimRecord) -> bool:
    """A record rebuilt from a CDI spec and not yet filled in from its claim."""
    return record.namespace == UNKNOWN
