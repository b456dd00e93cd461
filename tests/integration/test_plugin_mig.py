"""MIG devices through the plugin: dynamic MIG creates the device at the published placement
when a claim is prepared and destroys it when unprepared, turns MIG mode on for a MIG device
and off for the whole GPU, rolls back whatever fails, and owns the GPU's MIG devices (strays
are destroyed at start); static MIG injects what exists.
The mock's MIG state file plays the hardware."""

from __future__ import annotations

import json
from pathlib import Path

from driver.allocator import DeviceRef
from driver.nvml.mock import mock_provider
from driver.plugin.mig import MigManager
from tests.support.plugin import (
    DRIVER,
    NODE,
    Node,
    Start,
    cdi_problems,
    cdi_specs,
    live_mig,
    make_claim,
    mig_profile,
    result,
)

GPU0 = "GPU-6493d427-501d-5931-bd3f-97d1981f0fc8"  # dgx-h100 GPU 0 (minor 0)
GPU1 = "GPU-df0fc3e6-d2c7-5d85-984d-a4c26364deeb"  # GPU 1 (minor 1)
H100 = "GPU-38ab404c-3055-5622-b266-e2d6fb39931a"  # h100-80gb-hbm3 GPU 0: MIG mode off
PROFILE_3G, PROFILE_1G, PROFILE_4G, PROFILE_2G = 9, 19, 5, 14  # H100 GPU-instance profiles


def dynamic(start: Start, node: Node, profile: Path | None = None) -> object:
    return start(str(profile or mig_profile(node.root / "mig.yaml")), mock_state=node.mig_state,
                 mig_mode="dynamic")


def test_prepare_creates_the_device_at_its_placement_and_unprepare_destroys_it(
        node: Node, start: Start) -> None:
    running = dynamic(start, node)
    claim = make_claim(node.local, [result("gpu-0-mig-3g40gb-4", request="mig")])
    answer = running.kubelet.prepare([claim])[claim.uid]
    assert answer.error == ""
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_3G, 4, 1)]}
    spec = cdi_specs(node.cdi_root)[claim.uid]
    assert cdi_problems(spec) == []
    # GPU instance 2 (the 4-slice half at 4), compute instance 0: caps 3 + 9*2 and + 1
    assert spec["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia0"},
        {"path": "/dev/nvidia-caps/nvidia-cap21", "type": "c", "major": 241, "minor": 21},
        {"path": "/dev/nvidia-caps/nvidia-cap22", "type": "c", "major": 241, "minor": 22}]
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert live_mig(node.mig_state) == {} and cdi_specs(node.cdi_root) == {}


def test_several_mig_devices_of_one_claim_on_two_gpus(node: Node, start: Start) -> None:
    running = dynamic(start, node)
    claim = make_claim(node.local, [result("gpu-0-mig-1g10gb-0"), result("gpu-0-mig-1g10gb-1"),
                                    result("gpu-1-mig-4g40gb-0", request="big")])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_1G, 0, 1), (PROFILE_1G, 1, 1)],
                                         GPU1: [(PROFILE_4G, 0, 1)]}
    assert len(cdi_specs(node.cdi_root)[claim.uid]["devices"]) == 3
    running.kubelet.unprepare([claim])
    assert live_mig(node.mig_state) == {}


def test_a_failed_compute_instance_rolls_back_its_gpu_instance(node: Node, start: Start) -> None:
    profile = mig_profile(node.root / "faulty.yaml", faults={
        0: {"nvmlGpuInstanceCreateComputeInstance": "UNKNOWN"}})
    running = dynamic(start, node, profile)
    claim = make_claim(node.local, [result("gpu-0-mig-1g10gb-3")])
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert "cannot create the compute instance of MIG 1g.10gb at 3:1" in error
    assert live_mig(node.mig_state) == {}
    assert cdi_specs(node.cdi_root) == {} and running.plugin.state.records == {}


LEFT_BEHIND = {0: {"nvmlGpuInstanceCreateComputeInstance": "UNKNOWN",
                   "nvmlGpuInstanceDestroy": "IN_USE"}}  # and the rollback cannot destroy it


def test_a_gpu_instance_a_failed_rollback_leaves_is_kept_on_record_named_and_retried(
        node: Node, start: Start) -> None:
    running = dynamic(start, node, mig_profile(node.root / "faulty.yaml", faults=LEFT_BEHIND))
    claim = make_claim(node.local, [result("gpu-0-mig-1g10gb-3")])
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert f"cannot create the compute instance of MIG 1g.10gb at 3:1 on {GPU0}" in error
    assert "kept on record, rolled back when the claim is prepared again" in error
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_1G, 3, 0)]}
    (left,) = node.records()[claim.uid].devices
    assert node.records()[claim.uid].state == "PrepareStarted" and left.created_mig is not None
    gi_id = left.created_mig.gi_id
    assert gi_id is not None and f"destroying its GPU instance {gi_id} failed too" in error
    # claims that need its placement are refused by name, not by NVML's error code
    leftover = (f"ResourceClaim ns/{claim.name} ({claim.uid}), whose failed rollback left "
                f"gpu-0-mig-1g10gb-3 (GPU instance {gi_id} of profile {PROFILE_1G} at 3 on "
                f"{GPU0})")
    same, whole = (make_claim(node.local, [result(d)]) for d in ("gpu-0-mig-1g10gb-3", "gpu-0"))
    answers = running.kubelet.prepare([same, whole])
    assert answers[same.uid].error.endswith(f"gpu-0-mig-1g10gb-3 is taken by {leftover}")
    assert f"also held by gpu-0-mig-1g10gb-3 ({leftover})" in answers[whole.uid].error
    # its retry rolls it back first: refused while NVML still refuses, then prepared
    assert (f"rolling it back failed: cannot destroy the MIG device of profile {PROFILE_1G} "
            f"at 3 on {GPU0} (GPU instance {gi_id})") in \
        running.kubelet.prepare([claim])[claim.uid].error
    assert claim.uid in node.records()
    running.provider.nvml.profile.gpus[0].faults.clear()
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_1G, 3, 1)]}
    assert node.records()[claim.uid].state == "PrepareCompleted"


def test_a_gpu_instance_a_failed_rollback_leaves_stays_held_across_restarts_until_destroyed(
        node: Node, start: Start) -> None:
    faulty = mig_profile(node.root / "faulty.yaml", faults=LEFT_BEHIND)
    running = dynamic(start, node, faulty)
    claim = make_claim(node.local, [result("gpu-0-mig-2g20gb-2")])
    assert running.kubelet.prepare([claim])[claim.uid].error
    running.stop()
    running = dynamic(start, node, faulty)  # the start's rollback fails too: still held
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_2G, 2, 0)]}
    other = make_claim(node.local, [result("gpu-0-mig-2g20gb-2")])
    assert f"taken by ResourceClaim ns/{claim.name} ({claim.uid}), whose failed rollback " \
           f"left gpu-0-mig-2g20gb-2" in running.kubelet.prepare([other])[other.uid].error
    running.stop()
    running = dynamic(start, node)
    assert live_mig(node.mig_state) == {} and node.records() == {}
    assert running.kubelet.prepare([other])[other.uid].error == ""


def test_a_claim_whose_later_device_fails_undoes_the_earlier_ones(node: Node,
                                                                  start: Start) -> None:
    profile = mig_profile(node.root / "faulty.yaml", faults={
        1: {"nvmlDeviceCreateGpuInstanceWithPlacement": "INSUFFICIENT_RESOURCES"}})
    running = dynamic(start, node, profile)
    claim = make_claim(node.local, [result("gpu-0-mig-3g40gb-0"),
                                    result("gpu-1-mig-3g40gb-0", request="second")])
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert f"cannot create MIG 3g.40gb at 0:4 on {GPU1}: " in error
    assert live_mig(node.mig_state) == {}
    assert cdi_specs(node.cdi_root) == {}
    healthy = make_claim(node.local, [result("gpu-0-mig-3g40gb-0")])
    assert running.kubelet.prepare([healthy])[healthy.uid].error == ""  # nothing was left


def test_devices_sharing_hardware_with_a_prepared_claim_are_refused(node: Node,
                                                                    start: Start) -> None:
    running = dynamic(start, node)
    half = make_claim(node.local, [result("gpu-0-mig-4g40gb-0")])
    running.kubelet.prepare([half])
    inside = make_claim(node.local, [result("gpu-0-mig-1g10gb-2")])
    whole = make_claim(node.local, [result("gpu-0")])
    beside = make_claim(node.local, [result("gpu-0-mig-3g40gb-4")])
    answers = running.kubelet.prepare([inside, whole, beside])
    holder = f"gpu-0-mig-4g40gb-0 (ResourceClaim ns/{half.name} ({half.uid}))"
    # the 1g at 2 draws memory slice 2, which the 4g at 0 holds; the whole GPU draws every
    # counter of the set
    for refused in (inside, whole):
        error = answers[refused.uid].error
        assert error.startswith(f"cannot prepare ResourceClaim ns/{refused.name}: counter ")
        assert f" of {DRIVER}/{NODE}/gpu-0-counter-set is overdrawn by " in error
        assert holder in error
    assert answers[beside.uid].error == ""
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_4G, 0, 1), (PROFILE_3G, 4, 1)]}
    assert set(node.records()) == {half.uid, beside.uid}


def test_two_claims_asking_one_mig_placement_in_one_call_get_it_once(
        node: Node, start: Start) -> None:
    running = dynamic(start, node)
    first = make_claim(node.local, [result("gpu-1-mig-2g20gb-2")])
    second = make_claim(node.local, [result("gpu-1-mig-2g20gb-2")])
    answers = running.kubelet.prepare([first, second])
    refused = [uid for uid, answer in answers.items() if answer.error]
    assert len(refused) == 1
    winner = first if refused == [second.uid] else second
    assert answers[refused[0]].error.endswith(
        f"device {DRIVER}/{NODE}/gpu-1-mig-2g20gb-2 is taken by ResourceClaim "
        f"ns/{winner.name} ({winner.uid})")
    assert live_mig(node.mig_state) == {GPU1: [(PROFILE_2G, 2, 1)]}
    assert set(node.records()) == {winner.uid} and set(cdi_specs(node.cdi_root)) == {winner.uid}


def test_a_whole_gpu_then_its_partition_is_refused_and_nothing_is_made(
        node: Node, start: Start) -> None:
    running = dynamic(start, node)
    whole = make_claim(node.local, [result("gpu-0")])
    assert running.kubelet.prepare([whole])[whole.uid].error == ""
    part = make_claim(node.local, [result("gpu-1-mig-1g10gb-0"), result("gpu-0-mig-1g10gb-6")])
    error = running.kubelet.prepare([part])[part.uid].error
    assert f"also held by gpu-0 (ResourceClaim ns/{whole.name} ({whole.uid}))" in error
    assert live_mig(node.mig_state) == {}  # its free GPU-1 device was not made either
    assert set(node.records()) == {whole.uid} and set(cdi_specs(node.cdi_root)) == {whole.uid}


def test_the_ledger_is_rebuilt_from_the_checkpoint_at_start(node: Node, start: Start) -> None:
    profile = mig_profile(node.root / "mig.yaml")
    first = dynamic(start, node, profile)
    claim = make_claim(node.local, [result("gpu-0-mig-3g40gb-0")])
    assert first.kubelet.prepare([claim])[claim.uid].error == ""
    first.stop()
    second = dynamic(start, node, profile)
    key = f"ResourceClaim ns/{claim.name} ({claim.uid})"
    assert second.plugin.state.records.ledger.exclusive == {
        DeviceRef(DRIVER, NODE, "gpu-0-mig-3g40gb-0"): key}
    overlapping = make_claim(node.local, [result("gpu-0-mig-1g10gb-3")])
    assert f"also held by gpu-0-mig-3g40gb-0 ({key})" in \
        second.kubelet.prepare([overlapping])[overlapping.uid].error
    assert second.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert second.plugin.state.records.ledger.claims() == []
    assert second.kubelet.prepare([overlapping])[overlapping.uid].error == ""


def test_stray_mig_devices_are_destroyed_at_start_and_claimed_ones_kept(
        node: Node, start: Start) -> None:
    profile = mig_profile(node.root / "mig.yaml")
    first = dynamic(start, node, profile)
    claim = make_claim(node.local, [result("gpu-1-mig-1g10gb-6")])
    first.kubelet.prepare([claim])
    first.stop()
    outside = mock_provider(str(profile), node.mig_state)  # e.g. an admin's nvidia-smi
    outside.nvml.nvmlInit()
    gpu0 = next(g for g in first.plugin.state.published.inventory.gpus if g.uuid == GPU0)
    MigManager(outside).create(gpu0, gpu0.mig_profiles[0], gpu0.mig_profiles[0].placements[2])
    assert GPU0 in live_mig(node.mig_state)
    dynamic(start, node, profile)
    assert live_mig(node.mig_state) == {GPU1: [(PROFILE_1G, 6, 1)]}


def mig_mode(mock_state: Path) -> dict[str, bool]:
    """MIG mode by GPU UUID as the mock hardware holds it."""
    return json.loads(mock_state.read_text())["migEnabled"] if mock_state.exists() else {}


def test_mig_mode_follows_what_is_prepared_on_a_gpu_with_mig_off(node: Node,
                                                                 start: Start) -> None:
    running = start("h100-80gb-hbm3", mock_state=node.mig_state, mig_mode="dynamic")
    part = make_claim(node.local, [result("gpu-0-mig-1g10gb-0")])
    assert running.kubelet.prepare([part])[part.uid].error == ""
    assert mig_mode(node.mig_state) == {H100: True}
    assert live_mig(node.mig_state) == {H100: [(PROFILE_1G, 0, 1)]}
    # GPU instance 7 (the 1-slice at 0), compute instance 0: caps 3 + 9*7 and + 1
    assert [n["path"] for n in cdi_specs(node.cdi_root)[part.uid]["devices"][0]["containerEdits"][
        "deviceNodes"]] == ["/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap66",
                            "/dev/nvidia-caps/nvidia-cap67"]
    assert running.kubelet.unprepare([part]) == {part.uid: ""}
    assert live_mig(node.mig_state) == {} and mig_mode(node.mig_state) == {H100: True}
    whole = make_claim(node.local, [result("gpu-0")])
    assert running.kubelet.prepare([whole])[whole.uid].error == ""
    assert mig_mode(node.mig_state) == {H100: False}
    assert [n["path"] for n in cdi_specs(node.cdi_root)[whole.uid]["devices"][0]["containerEdits"][
        "deviceNodes"]] == ["/dev/nvidia0"]


def test_a_whole_gpu_is_refused_while_mig_devices_live_on_it(node: Node, start: Start) -> None:
    running = start("h100-80gb-hbm3", mock_state=node.mig_state, mig_mode="dynamic")
    part = make_claim(node.local, [result("gpu-0-mig-1g10gb-0")])
    assert running.kubelet.prepare([part])[part.uid].error == ""
    whole = make_claim(node.local, [result("gpu-0")])  # allocated against the counters
    assert f"also held by gpu-0-mig-1g10gb-0 (ResourceClaim ns/{part.name} ({part.uid}))" in \
        running.kubelet.prepare([whole])[whole.uid].error
    running.kubelet.unprepare([part])
    outside = mock_provider("h100-80gb-hbm3", node.mig_state)  # e.g. an admin's nvidia-smi
    outside.nvml.nvmlInit()
    gpu = running.plugin.state.published.inventory.gpus[0]
    profile = next(p for p in gpu.mig_profiles if p.id == PROFILE_1G)
    MigManager(outside).create(gpu, profile, profile.placements[3])
    error = running.kubelet.prepare([whole])[whole.uid].error
    assert error == (f"cannot use the whole GPU {H100}: MIG mode is on and MIG devices still "
                     "exist on it (1g.10gb at 3); unprepare the claims that hold them first")
    assert mig_mode(node.mig_state) == {H100: True}
    assert live_mig(node.mig_state) == {H100: [(PROFILE_1G, 3, 1)]}
    assert cdi_specs(node.cdi_root) == {} and running.plugin.state.records == {}


def test_a_gpu_that_cannot_enable_mig_fails_the_claim_cleanly(node: Node, start: Start) -> None:
    profile = mig_profile(node.root / "busy.yaml", base="h100-80gb-hbm3", gpus=(),
                          faults={0: {"nvmlDeviceSetMigMode": "IN_USE"}})
    running = dynamic(start, node, profile)
    claim = make_claim(node.local, [result("gpu-0-mig-1g10gb-0")])
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert error.startswith(f"cannot enable MIG mode on {H100}: ")
    assert error.endswith("; a process is using the GPU")
    assert mig_mode(node.mig_state) == {} and live_mig(node.mig_state) == {}
    assert cdi_specs(node.cdi_root) == {} and running.plugin.state.records == {}


def test_a_failed_creation_turns_mig_mode_off_again(node: Node, start: Start) -> None:
    profile = mig_profile(node.root / "faulty.yaml", base="h100-80gb-hbm3", gpus=(),
                          faults={0: {"nvmlDeviceCreateGpuInstanceWithPlacement": "UNKNOWN"}})
    running = dynamic(start, node, profile)
    claim = make_claim(node.local, [result("gpu-0-mig-1g10gb-0")])
    assert "cannot create MIG 1g.10gb at 0:1" in running.kubelet.prepare([claim])[claim.uid].error
    assert mig_mode(node.mig_state) == {H100: False} and live_mig(node.mig_state) == {}


def test_static_mig_devices_are_injected_as_they_are(node: Node, start: Start) -> None:
    running = start("a100-mig", mock_state=node.mig_state)
    before = node.mig_state.exists()
    claim = make_claim(node.local, [result("gpu-0-mig-3g20gb-4")])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    nodes = cdi_specs(node.cdi_root)[claim.uid]["devices"][0]["containerEdits"]["deviceNodes"]
    assert [n["path"] for n in nodes] == ["/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21",
                                          "/dev/nvidia-caps/nvidia-cap22"]
    running.kubelet.unprepare([claim])
    assert node.mig_state.exists() == before  # no MIG change was made
