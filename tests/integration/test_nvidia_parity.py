"""Every attribute and capacity NVIDIA's DRA driver publishes exists in our slices, same
name and type, on every mock machine, so a selector written for NVIDIA's slices reads ours.

NVIDIA's names and types below are copied by hand from NVIDIA/k8s-dra-driver-gpu at commit
22407113785e78c7763b4637689a201eb39c6199:
- cmd/gpu-kubelet-plugin/deviceinfo.go: GpuInfo.Attributes, GpuInfo.GetDevice (whole GPU),
  MigDeviceInfo.GetDevice (static MIG: + uuid, + memorySlice<i> per slice it holds);
- cmd/gpu-kubelet-plugin/mig.go: CommonAttributesMig, CommonCapacitiesMig;
- cmd/gpu-kubelet-plugin/partitions.go: fullGpuCapacity (memory), PartCapacities (dynamic
  MIG: the whole GPU carries each MIG capacity at its largest over the profiles).
`addressingMode` (string) is left out: NVIDIA publishes it only where NVML reports one
(coherent-memory systems such as GH200), which no mock machine is.
"""

from __future__ import annotations

from typing import Any

import pytest

from driver.inventory.discovery import discover
from driver.nvml.mock import list_profiles, mock_provider
from driver.resourceslice.build import MigMode, SliceOptions, build_slices

PCI = "resource.kubernetes.io"
GPU_ATTRIBUTES = {
    "type": "string", "uuid": "string", "productName": "string", "brand": "string",
    "architecture": "string", "cudaComputeCapability": "version", "driverVersion": "version",
    "cudaDriverVersion": "version", f"{PCI}/pciBusID": "string", f"{PCI}/pcieRoot": "string",
}
MIG_ATTRIBUTES = {
    "type": "string", "parentUUID": "string", "profile": "string", "productName": "string",
    "brand": "string", "architecture": "string", "cudaComputeCapability": "version",
    "driverVersion": "version", "cudaDriverVersion": "version",
    f"{PCI}/pciBusID": "string", f"{PCI}/pcieRoot": "string",
}
STATIC_MIG_ATTRIBUTES = {**MIG_ATTRIBUTES, "uuid": "string"}
MIG_CAPACITIES = {"multiprocessors", "copyEngines", "decoders", "encoders", "jpegEngines",
                  "ofaEngines", "memory"}
GPU_CAPACITIES = {"memory"}


def expected(device: dict[str, Any], mig_mode: str, partitioned: bool
             ) -> tuple[dict[str, str], set[str]]:
    """NVIDIA's attribute names/types and capacity names for the device's kind."""
    if device["attributes"]["type"]["string"] == "gpu":
        return GPU_ATTRIBUTES, MIG_CAPACITIES if partitioned else GPU_CAPACITIES
    if mig_mode == "dynamic":
        return MIG_ATTRIBUTES, MIG_CAPACITIES
    start = device["attributes"]["placementStart"]["int"]
    size = device["attributes"]["placementSize"]["int"]
    return STATIC_MIG_ATTRIBUTES, MIG_CAPACITIES | {
        f"memorySlice{i}" for i in range(start, start + size)}


@pytest.mark.parametrize("mig_mode", ["static", "dynamic"])
@pytest.mark.parametrize("profile", list_profiles())
def test_every_nvidia_attribute_and_capacity_is_published(profile: str,
                                                          mig_mode: MigMode) -> None:
    inventory = discover(mock_provider(profile))
    options = SliceOptions(driver="gpu.nvidia.com", node="node-1", mig_mode=mig_mode)
    slices = build_slices(inventory, options, generation=1)
    kinds: set[str] = set()
    for device in (d for s in slices for d in s["spec"].get("devices", [])):
        partitioned = "consumesCounters" in device
        attributes, capacities = expected(device, mig_mode, partitioned)
        kinds.add(device["attributes"]["type"]["string"])
        published = {name: next(iter(value)) for name, value in device["attributes"].items()}
        missing = {n: t for n, t in attributes.items() if published.get(n) != t}
        assert not missing, f"{device['name']}: NVIDIA's {missing}, ours {published}"
        assert capacities <= set(device.get("capacity", {})), device["name"]
    assert "gpu" in kinds or "mig" in kinds
