"""The records' ledger follows the claims `take` books and the saves that record them: a
claim booked by `take` is held once its record is saved, and by nothing once removed or
its save fails (`forget_unsaved`)."""

from __future__ import annotations

from pathlib import Path

from driver.allocator.ledger import DeviceRef
from driver.plugin.checkpoint import ClaimRecord, PreparedDevice
from driver.plugin.claims import ClaimRef
from driver.plugin.metrics import Metrics
from driver.plugin.node import Identity
from driver.plugin.records import Records, ledger_key
from tests.support.plugin import DRIVER, NODE, new_uid


def started(path: Path) -> Records:
    held = Records(Identity(DRIVER, NODE, "boot-1"), path, [], Metrics())
    held.save_all({})
    return held


def claim(name: str, *devices: str) -> tuple[ClaimRef, tuple[PreparedDevice, ...]]:
    uid = new_uid()
    return ClaimRef("ns", name, uid), tuple(
        PreparedDevice(("gpu",), NODE, d, (f"k8s.{DRIVER}/claim={uid}-{d}",), f"GPU-{d}")
        for d in devices)


def booked(held: Records) -> dict[DeviceRef, str]:
    """What the ledger holds whole (`ledger` takes the records' lock)."""
    return dict(held.ledger.exclusive)


def test_a_claim_taken_and_saved_holds_its_devices_until_removed(tmp_path: Path) -> None:
    held = started(tmp_path / "checkpoint.json")
    ref, devices = claim("a", "gpu-0", "gpu-1")
    other, wanted = claim("b", "gpu-1")
    key = ledger_key(ref.namespace, ref.name, ref.uid)
    mine = {DeviceRef(DRIVER, NODE, "gpu-0"): key, DeviceRef(DRIVER, NODE, "gpu-1"): key}
    record = ClaimRecord(ref.uid, ref.namespace, ref.name, "PrepareStarted", devices)
    with held.lock:
        assert held.take(ref, devices) == []
        held.save({ref.uid: record}, durable=False)
    assert booked(held) == mine
    with held.lock:
        held.save({ref.uid: record.with_state("PrepareCompleted")})
    assert booked(held) == mine
    with held.lock:
        assert held.take(other, wanted) == [f"device {DRIVER}/{NODE}/gpu-1 is taken by {key}"]
        held.save({ref.uid: None})
    assert booked(held) == {}
    with held.lock:
        assert held.take(other, wanted) == []


def test_a_claim_whose_save_failed_holds_nothing(tmp_path: Path) -> None:
    held = started(tmp_path / "checkpoint.json")
    ref, devices = claim("a", "gpu-0")
    record = ClaimRecord(ref.uid, ref.namespace, ref.name, "PrepareStarted", devices)
    with held.lock:
        assert held.take(ref, devices) == []
        held.forget_unsaved({ref.uid: record})
    assert booked(held) == {}
    with held.lock:
        assert held.take(ref, devices) == []
        held.save({ref.uid: record}, durable=False)
    assert booked(held) == {DeviceRef(DRIVER, NODE, "gpu-0"):
                            ledger_key(ref.namespace, ref.name, ref.uid)}
