"""Records rebuilt from the CDI specs on the node when the checkpoint is gone (issue 12,
defect 1): the specs' devices, resolved as the plugin publishes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.plugin import cdi
from driver.plugin.devices import device_index
from driver.plugin.evidence import UNKNOWN, rebuilt_records
from tests.support.plugin import DRIVER, NODE, mig_profile, new_uid


def spec(uid: str, *devices: str) -> dict[str, Any]:
    return {"cdiVersion": "0.5.0", "kind": cdi.kind(DRIVER),
            "devices": [{"name": cdi.device_name(uid, d), "containerEdits": {}}
                        for d in devices]}


def test_each_spec_becomes_a_prepared_record_holding_its_devices(tmp_path: Path) -> None:
    provider = mock_provider(str(mig_profile(tmp_path / "p.yaml")), tmp_path / "state.json")
    index = device_index(discover(provider), "dynamic")
    mig = next(name for name, t in index.items() if t.dynamic_profile is not None)
    whole = next(name for name, t in index.items() if t.kind == "gpu")
    a, b = new_uid(), new_uid()
    records, problems = rebuilt_records({a: spec(a, mig), b: spec(b, whole)}, DRIVER, NODE,
                                        index)
    assert problems == []
    assert records.keys() == {a, b}
    assert all(r.state == "PrepareCompleted" and r.namespace == UNKNOWN for r in records.values())
    (made,) = records[a].devices
    assert made.device == mig and made.gpu_uuid == index[mig].gpu.uuid
    assert made.cdi_device_ids == (cdi.qualified_name(DRIVER, cdi.device_name(a, mig)),)
    assert made.created_mig == index[mig].mig_to_create  # the sweep keeps it, unprepare ends it
    (gpu,) = records[b].devices
    assert gpu.device == whole and gpu.created_mig is None


def test_a_spec_that_names_no_published_device_keeps_its_record(tmp_path: Path) -> None:
    provider = mock_provider("l4-8x")
    index = device_index(discover(provider), "static")
    uid = new_uid()
    records, problems = rebuilt_records({uid: spec(uid, "gpu-99", "gpu-0"), new_uid(): None},
                                        DRIVER, NODE, index)
    assert [d.device for d in records[uid].devices] == ["gpu-0"]
    assert problems == [f"claim {uid}: CDI device '{uid}-gpu-99' is not a device this node "
                        "publishes"]
    assert len(records) == 2  # an unreadable spec is kept: nothing says it is not in use
