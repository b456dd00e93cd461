"""Slice builder rules that need no machine profile: names, versions, limits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from driver.inventory.model import Gpu, Inventory
from driver.resourceslice.build import (
    MAX_DEVICES,
    SliceOptions,
    build_slices,
    profile_label,
    semver,
    slice_name,
)

BASE = Gpu(index=0, minor=0, uuid="GPU-0", product_name="NVIDIA L4", brand="Nvidia",
           architecture="Ada Lovelace", cuda_compute_capability="8.9", memory_bytes=24 * 2**30,
           pci_bus_id="00000000:18:00.0", pcie_root="pci0000:15", numa_node=0,
           mig_enabled=False, mig_pending=False)


def many(n: int, **changes: object) -> Inventory:
    gpus = tuple(replace(BASE, index=i, minor=i, uuid=f"GPU-{i}", **changes) for i in range(n))
    return Inventory("580.159.04", "13.0", gpus, {})


def test_semver_drops_leading_zeros_and_pads() -> None:
    assert semver("580.159.04") == "580.159.4"
    assert semver("13.0") == "13.0.0"
    assert semver("9.0") == "9.0.0"


def test_profile_labels_are_dns_safe() -> None:
    assert profile_label("1g.10gb") == "1g10gb"
    assert profile_label("1g.10gb+me") == "1g10gb-me"
    assert profile_label("7g.141gb") == "7g141gb"


def test_slice_names_stay_within_253() -> None:
    long_node = "n" * 250
    name = slice_name(SliceOptions(driver="gpu.dra.dev", node=long_node), 3)
    assert len(name) <= 253 and name.endswith("-3")
    assert slice_name(SliceOptions(driver="gpu.dra.dev", node="node-a"), 0) == \
        "node-a-gpu.dra.dev-0"


def test_devices_split_at_128_and_pool_counts_agree() -> None:
    slices = build_slices(many(300), SliceOptions(driver="gpu.dra.dev", node="n1"), 7)
    sizes = [len(s["spec"]["devices"]) for s in slices]
    assert sizes == [MAX_DEVICES, MAX_DEVICES, 300 - 2 * MAX_DEVICES]
    for s in slices:
        assert s["spec"]["pool"] == {"name": "n1", "generation": 7, "resourceSliceCount": 3}
    names = [d["name"] for s in slices for d in s["spec"]["devices"]]
    assert len(set(names)) == 300


def test_tainted_devices_split_at_64() -> None:
    slices = build_slices(many(100, health_error="nvmlDeviceGetMemoryInfo: GPU is lost"),
                          SliceOptions(driver="gpu.dra.dev", node="n1"), 1)
    assert [len(s["spec"]["devices"]) for s in slices] == [64, 36]
    taint = slices[0]["spec"]["devices"][0]["taints"][0]
    assert taint == {"key": "gpu.dra.dev/unhealthy", "effect": "NoSchedule"}


def test_a_gpu_nvml_could_not_name_is_left_out() -> None:
    inventory = many(2)
    broken = replace(inventory.gpus[1], minor=-1, health_error="nvmlDeviceGetMinorNumber: x")
    slices = build_slices(replace(inventory, gpus=(inventory.gpus[0], broken)),
                          SliceOptions(driver="gpu.dra.dev", node="n1"), 1)
    assert [d["name"] for d in slices[0]["spec"]["devices"]] == ["gpu-0"]


def test_empty_node_publishes_an_empty_pool() -> None:
    slices = build_slices(many(0), SliceOptions(driver="gpu.dra.dev", node="n1"), 1)
    assert len(slices) == 1 and slices[0]["spec"]["devices"] == []


def test_long_strings_are_cut_to_64() -> None:
    slices = build_slices(many(1, product_name="X" * 100),
                          SliceOptions(driver="gpu.dra.dev", node="n1"), 1)
    assert slices[0]["spec"]["devices"][0]["attributes"]["productName"] == {"string": "X" * 64}


@pytest.mark.parametrize("layout", ["split", "combined"])
def test_no_counters_without_dynamic_mig(layout: str) -> None:
    slices = build_slices(many(4), SliceOptions(driver="d.x", node="n", mig_mode="dynamic",
                                                counter_layout=layout), 1)
    assert all("sharedCounters" not in s["spec"] for s in slices)
