"""The entries the plugin writes to a claim's status.devices (KEP-4817): the hardware
behind each device and its health, within what the API server accepts."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from driver.health.model import Condition, GpuHealth
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.plugin.checkpoint import MigInstance, PreparedDevice
from driver.plugin.claimstatus import DeviceHealth, claim_entries, device_status, settled
from driver.plugin.devices import Target, device_index
from driver.plugin.monitor import HealthView
from tests.support.plugin import DRIVER, NODE, mig_profile

AT = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
HEALTHY = DeviceHealth(None)

# metav1validation.ValidateConditions and resource/v1 validation (v1.37.2)
TYPE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
REASON = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
MAX_CONDITIONS, MAX_DATA, MAX_MESSAGE = 8, 10 * 1024, 32768


def assert_valid(entry: dict[str, Any]) -> None:
    """What the API server checks of one AllocatedDeviceStatus (but the allocation)."""
    conditions = entry["conditions"]
    assert 0 < len(conditions) <= MAX_CONDITIONS
    assert len({c["type"] for c in conditions}) == len(conditions)
    for c in conditions:
        assert TYPE.fullmatch(c["type"]) and len(c["type"]) <= 316, c
        assert c["status"] in ("True", "False", "Unknown"), c
        assert REASON.fullmatch(c["reason"]) and len(c["reason"]) <= 1024, c
        assert len(c["message"]) <= MAX_MESSAGE and TIME.fullmatch(c["lastTransitionTime"])
    if "data" in entry:
        raw = json.dumps(entry["data"])
        assert isinstance(entry["data"], dict) and len(raw) <= MAX_DATA


def prepared(target: Target, share_id: str | None = None,
             created: MigInstance | None = None) -> PreparedDevice:
    return PreparedDevice(request_names=("gpu",), pool=NODE, device=target.name,
                          cdi_device_ids=("x",), gpu_uuid=target.gpu.uuid,
                          share_id=share_id, created_mig=created)


def ready(entry: dict[str, Any]) -> dict[str, Any]:
    [condition] = [c for c in entry["conditions"] if c["type"] == "Ready"]
    return condition


def test_a_whole_gpu_names_its_uuid_and_is_ready() -> None:
    index = device_index(discover(mock_provider("dgx-h100")), "static")
    target = index["gpu-3"]
    entry = device_status(DRIVER, prepared(target), target, HEALTHY, "550.1", AT)
    assert {k: entry[k] for k in ("driver", "pool", "device")} == \
        {"driver": DRIVER, "pool": NODE, "device": "gpu-3"}
    assert "shareID" not in entry
    assert entry["data"] == {"type": "gpu", "uuid": target.gpu.uuid,
                             "pciBusID": target.gpu.pci_bus_id,
                             "productName": target.gpu.product_name, "driverVersion": "550.1"}
    assert entry["conditions"] == [{"type": "Ready", "status": "True", "reason": "Prepared",
                                    "message": "prepared; the GPU is healthy",
                                    "lastTransitionTime": "2026-12-07T05:00:00Z"}]
    assert_valid(entry)


def test_a_share_carries_its_share_id() -> None:
    target = device_index(discover(mock_provider("dgx-h100")), "static")["gpu-0"]
    share = "6b3a1b0e-8a4e-4a4e-9f0e-0c9b2f1d7a11"
    entry = device_status(DRIVER, prepared(target, share), target, HEALTHY, "550.1", AT)
    assert entry["shareID"] == share


def test_a_static_mig_device_names_its_uuid_parent_and_instances() -> None:
    index = device_index(discover(mock_provider("a100-mig")), "static")
    name, target = next((n, t) for n, t in index.items() if t.static_mig is not None)
    live = target.static_mig
    assert live is not None and target.placement is not None
    entry = device_status(DRIVER, prepared(target), target, HEALTHY, "550.1", AT)
    assert entry["device"] == name
    assert entry["data"] == {
        "type": "mig", "uuid": live.uuid, "parentUUID": target.gpu.uuid,
        "profile": live.profile, "gpuInstance": live.gi_id, "computeInstance": live.ci_id,
        "placement": {"start": target.placement.start, "size": target.placement.size},
        "productName": target.gpu.product_name, "driverVersion": "550.1"}
    assert_valid(entry)


def test_a_dynamic_mig_device_names_the_instances_it_was_given(tmp_path: Path) -> None:
    provider = mock_provider(str(mig_profile(tmp_path / "p.yaml")), tmp_path / "state.json")
    index = device_index(discover(provider), "dynamic")
    target = next(t for t in index.values() if t.dynamic_profile is not None)
    made = target.mig_to_create
    assert made is not None and target.dynamic_profile is not None
    created = MigInstance(made.profile_id, made.start, made.size, gi_id=3, ci_id=0)
    entry = device_status(DRIVER, prepared(target, created=created), target, HEALTHY,
                          "550.1", AT)
    assert entry["data"]["parentUUID"] == target.gpu.uuid
    assert (entry["data"]["profile"], entry["data"]["gpuInstance"],
            entry["data"]["computeInstance"]) == (target.dynamic_profile.name, 3, 0)
    assert_valid(entry)


def every_trouble(since: datetime) -> GpuHealth:
    """All seven kinds at once, and several XIDs."""
    c = [Condition("out-of-service", "NoExecute", since, since, "maintenance"),
         Condition("gpu-lost", "NoExecute", since, since),
         Condition("ecc", "NoExecute", since, since, "double-bit"),
         Condition("recovery", "NoExecute", since, since, "reset"),
         Condition("remap-failure", "NoExecute", since, since),
         Condition("unmonitored", "None", since, since)]
    c += [Condition("xid", "NoExecute", since + timedelta(seconds=i), since, str(x), xid=x)
          for i, x in enumerate((79, 48, 94))]
    return GpuHealth(0, tuple(c))


def test_an_unhealthy_gpu_is_not_ready_and_says_why_within_the_limits() -> None:
    target = device_index(discover(mock_provider("dgx-h100")), "static")["gpu-0"]
    health = DeviceHealth(every_trouble(AT - timedelta(minutes=5)))
    entry = device_status(DRIVER, prepared(target), target, health, "550.1", AT)
    assert_valid(entry)
    first = ready(entry)
    assert (first["status"], first["reason"]) == ("False", "AdminRequest")
    assert "maintenance" in first["message"]
    assert [c["type"] for c in entry["conditions"]][:3] == ["Ready", "OutOfService", "GpuLost"]
    # the taints' rules: the most severe four; the XIDs as one, the latest named
    xid = next(c for c in entry["conditions"] if c["type"] == "XidError")
    assert xid["reason"] == "Xid94" and "94" in xid["message"]


def test_an_xid_alone_names_itself_and_its_meaning() -> None:
    target = device_index(discover(mock_provider("dgx-h100")), "static")["gpu-0"]
    since = AT + timedelta(minutes=1)
    health = DeviceHealth(GpuHealth(0, (Condition("xid", "NoExecute", since, since, "79",
                                                  xid=79),)))
    entry = device_status(DRIVER, prepared(target), target, health, "550.1", AT)
    first = ready(entry)
    assert (first["status"], first["reason"], first["lastTransitionTime"]) == \
        ("False", "Xid79", "2026-12-07T05:01:00Z")
    assert "fallen off the bus" in first["message"].lower()
    assert_valid(entry)


def test_unwatched_events_leave_the_device_unknown() -> None:
    target = device_index(discover(mock_provider("dgx-h100")), "static")["gpu-0"]
    health = DeviceHealth(GpuHealth(0, (Condition("unmonitored", "None", AT, AT),)))
    entry = device_status(DRIVER, prepared(target), target, health, "550.1", AT)
    assert (ready(entry)["status"], ready(entry)["reason"]) == ("Unknown", "EventsUnsupported")
    assert_valid(entry)


def test_a_gpu_discovery_could_not_read_and_a_device_gone_are_not_ready() -> None:
    target = device_index(discover(mock_provider("dgx-h100")), "static")["gpu-0"]
    broken = device_status(DRIVER, prepared(target), target,
                           DeviceHealth(None, "nvmlDeviceGetUUID: GPU is lost"), "550", AT)
    assert (ready(broken)["status"], ready(broken)["reason"]) == ("False", "DiscoveryError")
    gone = device_status(DRIVER, prepared(target), None, HEALTHY, "550", AT)
    assert (ready(gone)["status"], ready(gone)["reason"]) == ("False", "DeviceGone")
    assert "data" not in gone
    for entry in (broken, gone):
        assert_valid(entry)


def test_a_claims_entries_take_the_health_the_monitor_sees() -> None:
    inventory = discover(mock_provider("dgx-h100"))
    index = device_index(inventory, "static")
    devices = [prepared(index["gpu-0"]), prepared(index["gpu-1"])]
    since = AT + timedelta(seconds=30)
    sick = GpuHealth(index["gpu-1"].gpu.minor,
                     (Condition("gpu-lost", "NoExecute", since, since),))
    view = HealthView(gpus={index["gpu-1"].gpu.minor: sick}, causes={}, uuids={})
    entries = claim_entries(DRIVER, index, inventory.driver_version, view, devices, AT)
    assert [(e["device"], ready(e)["status"]) for e in entries] == \
        [("gpu-0", "True"), ("gpu-1", "False")]
    assert entries[0]["data"]["driverVersion"] == inventory.driver_version


def test_ready_keeps_its_transition_time_until_its_status_changes() -> None:
    target = device_index(discover(mock_provider("dgx-h100")), "static")["gpu-0"]
    since = AT + timedelta(minutes=1)
    sick = DeviceHealth(GpuHealth(0, (Condition("gpu-lost", "NoExecute", since, since),)))
    later, latest = AT + timedelta(minutes=2), AT + timedelta(minutes=3)

    def write(health: DeviceHealth, before: list[dict[str, Any]] | None,
              now: datetime) -> list[dict[str, Any]]:
        return settled(before, [device_status(DRIVER, prepared(target), target, health,
                                              "550", AT)], now)

    first = write(HEALTHY, None, AT)
    assert ready(first[0])["lastTransitionTime"] == "2026-12-07T05:00:00Z"
    assert write(HEALTHY, first, later) == first  # nothing changed: nothing to write
    lost = write(sick, first, later)
    assert (ready(lost[0])["status"], ready(lost[0])["lastTransitionTime"]) == \
        ("False", "2026-12-07T05:02:00Z")
    back = write(HEALTHY, lost, latest)
    assert (ready(back[0])["status"], ready(back[0])["lastTransitionTime"]) == \
        ("True", "2026-12-07T05:03:00Z")
