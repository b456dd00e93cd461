"""Discovery over every mock machine gives what the hardware would show."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest
import yaml

import driver.nvml
from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.inventory.topology import nvlink_islands
from driver.nvml.mock import list_profiles, mock_provider

PROFILES = Path(driver.nvml.__file__).parent / "profiles"
FIXTURE = Path(__file__).parents[1] / "fixtures/nvml/h200-141gb-single"


def inv(profile: str) -> Inventory:
    return discover(mock_provider(profile))


@pytest.mark.parametrize("profile", list_profiles())
def test_every_profile_discovers_healthy_gpus_with_stable_identity(profile: str) -> None:
    inventory = inv(profile)
    assert inventory.gpus
    for gpu in inventory.gpus:
        assert gpu.healthy, gpu.health_error
        assert gpu.uuid.startswith("GPU-")
        assert gpu.minor >= 0 and gpu.memory_bytes > 0
    assert len({g.minor for g in inventory.gpus}) == len(inventory.gpus)
    assert len({g.uuid for g in inventory.gpus}) == len(inventory.gpus)
    # symmetric and complete: every pair has a class
    pairs = {(a.index, b.index) for a, b in combinations(inventory.gpus, 2)}
    assert set(inventory.links) == pairs
    assert discover(mock_provider(profile)) == inventory, "discovery is deterministic"


def test_dgx_h100_is_one_nvswitch_island_over_two_numa_nodes() -> None:
    inventory = inv("dgx-h100")
    assert len(inventory.gpus) == 8
    assert {g.product_name for g in inventory.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert set(inventory.links.values()) == {"NV18"}
    assert nvlink_islands(inventory) == [tuple(range(8))]
    for gpu in inventory.gpus:
        assert len(gpu.nvlinks) == 18
        assert {link.version for link in gpu.nvlinks} == {"4.0"}
        assert {link.remote_type for link in gpu.nvlinks} == {"switch"}
    assert [g.numa_node for g in inventory.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({g.pcie_root for g in inventory.gpus}) > 1
    assert all(not g.mig_enabled and g.mig_profiles for g in inventory.gpus)


def test_dgx_a100_has_twelve_nvlink3_links_per_gpu() -> None:
    inventory = inv("dgx-a100")
    assert len(inventory.gpus) == 8
    assert set(inventory.links.values()) == {"NV12"}
    assert all(len(g.nvlinks) == 12 for g in inventory.gpus)
    assert {link.version for g in inventory.gpus for link in g.nvlinks} <= {"3.0", "3.1"}


def test_a100_pcie_bridges_make_pairs() -> None:
    inventory = inv("a100-pcie-4x")
    assert inventory.link(0, 1) == inventory.link(2, 3) == "NV12"
    for a, b in [(0, 2), (0, 3), (1, 2), (1, 3)]:
        assert not inventory.link(a, b).startswith("NV")
    assert inventory.link(0, 2) == "SYS", "the two pairs sit on different NUMA nodes"
    assert nvlink_islands(inventory) == [(0, 1), (2, 3)]
    assert len({g.numa_node for g in inventory.gpus}) == 2


def test_l4_has_no_nvlink_and_no_mig() -> None:
    inventory = inv("l4-8x")
    assert len(inventory.gpus) == 8
    assert all(not g.nvlinks and not g.mig_profiles for g in inventory.gpus)
    assert not any(link.startswith("NV") for link in inventory.links.values())
    assert nvlink_islands(inventory) == [(i,) for i in range(8)]


def test_partial_mesh_islands_are_all_to_all_groups() -> None:
    inventory = inv("mesh-4x")
    linked = {pair for pair, link in inventory.links.items() if link.startswith("NV")}
    assert 0 < len(linked) < 6, "partially connected"
    for island in nvlink_islands(inventory):
        assert all(pair in linked for pair in combinations(island, 2))


def test_a100_mig_lists_live_instances_with_cap_minors() -> None:
    inventory = inv("a100-mig")
    mig, whole = inventory.gpus
    assert mig.mig_enabled and not whole.mig_enabled
    assert not whole.mig_devices
    profiles = sorted(d.profile for d in mig.mig_devices)
    assert profiles == ["1g.5gb", "1g.5gb", "2g.10gb", "3g.20gb"]
    placements = [d.placement for d in mig.mig_devices]
    assert not any(a.overlaps(b) for a, b in combinations(placements, 2))
    for device in mig.mig_devices:
        assert device.uuid.startswith("MIG-")
        assert device.gi_cap_minor == 3 + 135 * mig.minor + 9 * device.gi_id
        assert device.ci_cap_minor == 4 + 135 * mig.minor + 9 * device.gi_id + device.ci_id
        legal = next(p.placements for p in mig.mig_profiles if p.id == device.profile_id)
        assert device.placement in legal


def test_h200_matches_the_real_capture() -> None:
    calls = json.loads((FIXTURE / "nvml.json").read_text())["calls"]
    gpu = inv("h200-141gb").gpus[0]
    assert gpu.uuid == calls["dev0.UUID"]
    assert gpu.product_name == calls["dev0.Name"]
    assert gpu.memory_bytes == calls["dev0.MemoryInfo"]["total"]
    assert gpu.pci_bus_id == calls["dev0.PciInfo"]["busId"]
    assert gpu.minor == calls["dev0.MinorNumber"]
    assert gpu.nvlinks == ()
    assert gpu.numa_node is None
    extra = (FIXTURE / "extra.txt").read_text()
    for profile in gpu.mig_profiles:
        starts = ",".join(str(p.start) for p in profile.placements)
        size = profile.placements[0].size
        assert f"Profile ID {profile.id:2d} Placement" in extra
        assert f"{{{starts}}}:{size}" in extra
    assert {p.id for p in gpu.mig_profiles} == {19, 20, 15, 14, 9, 5, 0}


def test_an_nvml_error_on_one_gpu_marks_only_that_gpu(tmp_path: Path) -> None:
    profile = yaml.safe_load((PROFILES / "dgx-h100.yaml").read_text())
    profile["gpus"][3]["faults"] = {"nvmlDeviceGetMemoryInfo": "GPU_IS_LOST"}
    profile["gpus"][5]["faults"] = {"nvmlDeviceGetHandleByIndex": "GPU_IS_LOST"}
    path = tmp_path / "dgx-h100-faulty.yaml"
    path.write_text(yaml.safe_dump(profile))
    inventory = discover(mock_provider(str(path)))
    assert len(inventory.gpus) == 8
    broken = {g.index: g.health_error for g in inventory.gpus if not g.healthy}
    assert set(broken) == {3, 5}
    assert "nvmlDeviceGetMemoryInfo" in broken[3] and "GPU is lost" in broken[3]
    assert "nvmlDeviceGetHandleByIndex" in broken[5]
    gpu3 = inventory.gpus[3]
    assert gpu3.uuid and gpu3.minor == 3, "what NVML did answer is kept"
    assert all(3 not in pair and 5 not in pair for pair in inventory.links)
    assert inventory.link(0, 1) == "NV18"
