"""The checkpoint survives upgrades and downgrades: what one version writes, another reads,
keeping the fields it does not know."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from driver.plugin.checkpoint import (
    SCHEMA_VERSION,
    Checkpoint,
    CheckpointError,
    ClaimRecord,
    MigInstance,
    PreparedDevice,
    from_json,
    to_json,
)

UID = "0b8f3c9e-2d4a-4c1b-8e7f-6a5d4c3b2a19"

RECORD = ClaimRecord(
    uid=UID, namespace="ml", name="train", state="PrepareCompleted",
    devices=(
        PreparedDevice(request_names=("gpu",), pool="node-a", device="gpu-0",
                       cdi_device_ids=(f"k8s.gpu.dra.dev/claim={UID}-gpu-0",),
                       gpu_uuid="GPU-1", timeslice="Long",
                       config={"kind": "GpuConfig", "sharing": {"strategy": "TimeSlicing"}}),
        PreparedDevice(request_names=("mig",), pool="node-a", device="gpu-1-mig-1g10gb-3",
                       cdi_device_ids=(f"k8s.gpu.dra.dev/claim={UID}-gpu-1-mig-1g10gb-3",),
                       gpu_uuid="GPU-2", admin_access=False, share_id="s-1",
                       mps=f"/var/lib/kubelet/plugins/gpu.dra.dev/mps/{UID}",
                       created_mig=MigInstance(profile_id=19, start=3, size=1, gi_id=10,
                                               ci_id=0)),
    ))


def test_every_field_round_trips() -> None:
    checkpoint = Checkpoint(boot_id="boot-1", claims={UID: RECORD})
    data = json.loads(json.dumps(to_json(checkpoint)))
    assert data["schemaVersion"] == SCHEMA_VERSION
    assert from_json(data) == checkpoint


def newer_file() -> dict[str, Any]:
    """What a later version might write: a higher schema version and fields of its own at
    every level."""
    data = to_json(Checkpoint(boot_id="boot-1", claims={UID: RECORD}))
    data["schemaVersion"] = SCHEMA_VERSION + 1
    data["nodeName"] = "node-a"
    claim = data["claims"][UID]
    claim["status"] = {"allocation": {"devices": {"results": []}}}
    claim["devices"][0]["vfio"] = {"group": 7}
    claim["devices"][1]["createdMig"]["migUUID"] = "MIG-x"
    return data


def test_a_newer_versions_file_loads_and_its_fields_are_written_back() -> None:
    data = newer_file()
    loaded = from_json(copy.deepcopy(data))
    assert loaded.claims[UID].devices[1].created_mig == RECORD.devices[1].created_mig
    written = to_json(loaded)
    assert written["schemaVersion"] == SCHEMA_VERSION  # says who wrote it last
    written["schemaVersion"] = data["schemaVersion"]
    assert written == data


def test_a_changed_claim_keeps_the_fields_this_version_does_not_know() -> None:
    loaded = from_json(newer_file())
    changed = loaded.with_claims({UID: loaded.claims[UID].with_state("UnprepareStarted")})
    claim = to_json(changed)["claims"][UID]
    assert claim["state"] == "UnprepareStarted"
    assert claim["status"] == {"allocation": {"devices": {"results": []}}}
    assert claim["devices"][0]["vfio"] == {"group": 7}


def test_an_older_file_with_only_the_required_fields_loads() -> None:
    data = {"claims": {UID: {"namespace": "ml", "name": "train", "state": "PrepareStarted",
                             "devices": [{"pool": "node-a", "device": "gpu-0",
                                          "gpuUUID": "GPU-1"}]}}}
    loaded = from_json(data)
    assert loaded.schema_version == 0
    assert loaded.boot_id == ""  # no boot id: adopted as is
    device = loaded.claims[UID].devices[0]
    assert (device.request_names, device.cdi_device_ids, device.admin_access,
            device.created_mig) == ((), (), False, None)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["claims"][UID].update(state="Preparing"),
     f"claims.{UID}.state: unknown state 'Preparing'"),
    (lambda d: d["claims"][UID].pop("namespace"), f"claims.{UID}.namespace: missing"),
    (lambda d: d["claims"][UID]["devices"][1]["createdMig"].update(start="3"),
     f"claims.{UID}.devices[1].createdMig.start: unexpected str"),
    (lambda d: d["claims"][UID]["devices"][0].update(requestNames=[1]),
     f"claims.{UID}.devices[0].requestNames: not a list of strings"),
    (lambda d: d.update(claims=[]), "claims: not an object"),
])
def test_a_damaged_file_is_refused_naming_the_field(edit: Any, message: str) -> None:
    data = to_json(Checkpoint(boot_id="boot-1", claims={UID: RECORD}))
    edit(data)
    with pytest.raises(CheckpointError, match="checkpoint /x: ") as caught:
        from_json(data, "/x")
    assert message in str(caught.value)
