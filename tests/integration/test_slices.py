"""ResourceSlices built from every mock machine: complete, valid, topology-aware."""

from __future__ import annotations

import copy
from itertools import combinations
from typing import Any

import kubernetes_validate
import pytest
import yaml

from driver.inventory.discovery import discover
from driver.inventory.model import Inventory, Placement
from driver.nvml.mock import list_profiles, mock_provider
from driver.resourceslice.build import SliceOptions, build_slices, limit_violations

DRIVER = "gpu.dra.dev"


def inventory(profile: str) -> Inventory:
    return discover(mock_provider(profile))


def slices_of(profile: str, mig_mode: str = "static", layout: str = "split") -> list[dict]:
    options = SliceOptions(driver=DRIVER, node="gpu-node-1", mig_mode=mig_mode,
                           counter_layout=layout)
    return build_slices(inventory(profile), options, generation=3)


def devices(slices: list[dict]) -> list[dict[str, Any]]:
    return [d for s in slices for d in s["spec"].get("devices", [])]


def attr(device: dict[str, Any], name: str) -> Any:
    value = device["attributes"].get(name)
    return None if value is None else next(iter(value.values()))


CASES = [(p, m, lay) for p in list_profiles() for m in ("static", "dynamic")
         for lay in (("split", "combined") if m == "dynamic" else ("split",))]


@pytest.mark.parametrize(("profile", "mig_mode", "layout"), CASES)
def test_valid_under_strict_schemas_and_our_limits(profile: str, mig_mode: str,
                                                   layout: str) -> None:
    slices = slices_of(profile, mig_mode, layout)
    assert limit_violations(slices) == []
    versions = ["1.34.0"] if layout == "combined" else ["1.35.0", "1.36.0", "1.37.0"]
    for version in versions:
        for s in slices:
            kubernetes_validate.validate(s, version, strict=True)
    for s in slices:
        assert s["spec"]["pool"] == {"name": "gpu-node-1", "generation": 3,
                                     "resourceSliceCount": len(slices)}
        assert s["spec"]["nodeName"] == "gpu-node-1" and s["spec"]["driver"] == DRIVER
        if layout == "split":
            assert not ("devices" in s["spec"] and "sharedCounters" in s["spec"])


@pytest.mark.parametrize(("profile", "mig_mode", "layout"), CASES)
def test_deterministic_to_the_byte(profile: str, mig_mode: str, layout: str) -> None:
    first = yaml.safe_dump_all(slices_of(profile, mig_mode, layout), sort_keys=False)
    second = yaml.safe_dump_all(slices_of(profile, mig_mode, layout), sort_keys=False)
    assert first == second


def test_whole_gpu_attributes_follow_nvidias_names() -> None:
    gpu = devices(slices_of("dgx-h100"))[0]
    assert gpu["name"] == "gpu-0"
    assert attr(gpu, "type") == "gpu"
    assert attr(gpu, "productName") == "NVIDIA H100 80GB HBM3"
    assert attr(gpu, "architecture") == "Hopper"
    assert attr(gpu, "cudaComputeCapability") == "9.0.0"
    assert attr(gpu, "uuid").startswith("GPU-")
    assert attr(gpu, "resource.kubernetes.io/pciBusID") == "0000:18:00.0"
    assert attr(gpu, "resource.kubernetes.io/pcieRoot").startswith("pci")
    assert attr(gpu, "resource.kubernetes.io/numaNode") == 0
    assert gpu["capacity"]["memory"]["value"].isdigit()


def islands(slices: list[dict]) -> dict[str, Any]:
    return {d["name"]: attr(d, "nvlinkIsland") for d in devices(slices)}


def test_nvswitch_board_is_one_island_of_eight() -> None:
    slices = slices_of("dgx-h100")
    assert set(islands(slices).values()) == {0}
    for gpu in devices(slices):
        assert attr(gpu, "nvlinkIslandSize") == 8
        assert attr(gpu, "nvlinkLinks") == 18
        assert attr(gpu, "nvlinkBandwidthGBps") == 900
        assert attr(gpu, "nvlinkSwitched") is True


def test_bridged_pairs_are_islands_of_two() -> None:
    assert islands(slices_of("a100-pcie-4x")) == {"gpu-0": 0, "gpu-1": 0, "gpu-2": 1,
                                                  "gpu-3": 1}


def test_pcie_only_machine_has_no_island() -> None:
    assert set(islands(slices_of("l4-8x")).values()) == {None}


def test_partial_mesh_islands_are_fully_connected() -> None:
    inv = inventory("mesh-4x")
    by_island: dict[int, list[int]] = {}
    for device in devices(slices_of("mesh-4x")):
        if attr(device, "nvlinkIsland") is not None:
            minor = int(device["name"].removeprefix("gpu-"))
            index = next(g.index for g in inv.gpus if g.minor == minor)
            by_island.setdefault(attr(device, "nvlinkIsland"), []).append(index)
    assert by_island
    for members in by_island.values():
        for a, b in combinations(members, 2):
            assert inv.link(a, b).startswith("NV")


def test_static_mig_gpu_is_offered_as_its_instances_only() -> None:
    names = [d["name"] for d in devices(slices_of("a100-mig"))]
    assert "gpu-0" not in names and "gpu-1" in names
    mig = [d for d in devices(slices_of("a100-mig")) if attr(d, "type") == "mig"]
    assert sorted(attr(d, "profile") for d in mig) == ["1g.5gb", "1g.5gb", "2g.10gb", "3g.20gb"]
    parent = inventory("a100-mig").gpus[0]
    for device in mig:
        assert attr(device, "parentUUID") == parent.uuid
        assert attr(device, "uuid").startswith("MIG-")
        start, size = attr(device, "placementStart"), attr(device, "placementSize")
        assert set(device["capacity"]) == {"multiprocessors", "copyEngines", "decoders",
                                           "encoders", "jpegEngines", "ofaEngines", "memory",
                                           *(f"memorySlice{i}" for i in range(start, start + size))}
        assert device["name"].startswith("gpu-0-mig-")


def test_dynamic_mig_publishes_every_profile_and_placement_on_counters() -> None:
    slices = slices_of("h100-80gb-hbm3", "dynamic")
    gpu = inventory("h100-80gb-hbm3").gpus[0]
    (counter_set,) = [c for s in slices for c in s["spec"].get("sharedCounters", [])]
    published = devices(slices)
    expected = 1 + sum(len(p.placements) for p in gpu.mig_profiles)
    assert len(published) == expected
    whole = published[0]
    assert whole["name"] == "gpu-0"
    assert set(whole["consumesCounters"][0]["counters"]) == set(counter_set["counters"])
    slots = sorted(n for n in counter_set["counters"] if n.startswith("memory-slice-"))
    assert slots == [f"memory-slice-{i}" for i in range(8)]
    for device in published[1:]:
        (use,) = device["consumesCounters"]
        assert use["counterSet"] == counter_set["name"]
        start, size = attr(device, "placementStart"), attr(device, "placementSize")
        used = sorted(n for n in use["counters"] if n.startswith("memory-slice-"))
        assert used == sorted(f"memory-slice-{i}" for i in range(start, start + size))
        label = attr(device, "profile").replace(".", "").replace("+", "-")
        assert device["name"] == f"gpu-0-mig-{label}-{start}"


def test_dynamic_overlap_is_exactly_counter_conflict() -> None:
    """Two partitions can be allocated together iff their placements do not overlap."""
    published = devices(slices_of("h100-80gb-hbm3", "dynamic"))[1:]
    for a, b in combinations(published, 2):
        pa = Placement(attr(a, "placementStart"), attr(a, "placementSize"))
        pb = Placement(attr(b, "placementStart"), attr(b, "placementSize"))
        slots_a = {n for n in a["consumesCounters"][0]["counters"] if n.startswith("memory-")}
        slots_b = {n for n in b["consumesCounters"][0]["counters"] if n.startswith("memory-")}
        assert bool(slots_a & slots_b - {"memory"}) == pa.overlaps(pb)


def test_combined_layout_keeps_counters_beside_their_devices() -> None:
    for s in slices_of("dgx-h100", "dynamic", "combined"):
        names = {c["name"] for c in s["spec"]["sharedCounters"]}
        assert {u["counterSet"] for d in s["spec"]["devices"]
                for u in d["consumesCounters"]} <= names


def test_limit_checker_names_the_field() -> None:
    slices = copy.deepcopy(slices_of("dgx-h100", "dynamic"))
    slices[1]["spec"]["devices"][0]["name"] = "GPU_0!"
    slices[2]["spec"]["devices"][0]["consumesCounters"][0]["counterSet"] = "nope"
    problems = limit_violations(slices)
    assert any("spec.devices[0].name" in p and "GPU_0!" in p for p in problems)
    assert any("consumesCounters" in p and "nope" in p for p in problems)
