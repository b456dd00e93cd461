"""The monitor's health in the slices: a GPU's taints on the GPU and on every MIG device of
it, nothing for healthy GPUs (the slices are those of a plugin without a monitor),
informational taints only where the API server takes effect None, and taints counting
toward the 64-device limit of a slice."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from driver.health.classify import HealthSettings
from driver.health.model import GpuHealth, XidEvent
from driver.health.state import observe
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices
from tests.unit.test_slices_rules import many

AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
DRIVER = "gpu.dra.dev"


def health_after(minor: int, xid: int) -> GpuHealth:
    health, _ = observe(GpuHealth(minor), XidEvent(minor, xid, AT), HealthSettings())
    return health


def taints_by_device(slices: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {d["name"]: d["taints"] for s in slices for d in s["spec"].get("devices", [])
            if "taints" in d}


def test_healthy_gpus_publish_the_slices_of_a_plugin_without_a_monitor() -> None:
    inventory = discover(mock_provider("dgx-h100"))
    options = SliceOptions(DRIVER, "n1", "dynamic")
    healthy = {g.minor: GpuHealth(g.minor) for g in inventory.gpus}
    assert build_slices(inventory, options, 1, healthy) == build_slices(inventory, options, 1)


def test_a_fatal_xid_taints_the_gpu_and_each_of_its_mig_devices() -> None:
    inventory = discover(mock_provider("dgx-h100"))
    slices = build_slices(inventory, SliceOptions(DRIVER, "n1", "dynamic"), 1,
                          {3: health_after(3, 79)})
    tainted = taints_by_device(slices)
    assert "gpu-3" in tainted and len(tainted) > 1
    assert all(name == "gpu-3" or name.startswith("gpu-3-mig-") for name in tainted)
    assert tainted["gpu-3"] == [{"key": f"{DRIVER}/xid", "effect": "NoSchedule",
                                 "timeAdded": "2026-12-06T12:00:00Z", "value": "79"}]
    assert all(t == tainted["gpu-3"] for t in tainted.values())


def test_informational_taints_only_where_effect_none_is_accepted() -> None:
    inventory = many(2)
    health = {0: health_after(0, 13)}
    split = taints_by_device(build_slices(inventory, SliceOptions(DRIVER, "n1"), 1, health))
    assert split == {"gpu-0": [{"key": f"{DRIVER}/xid", "effect": "None",
                                "timeAdded": "2026-12-06T12:00:00Z", "value": "13"}]}
    combined = SliceOptions(DRIVER, "n1", counter_layout="combined")  # Kubernetes 1.34
    assert taints_by_device(build_slices(inventory, combined, 1, health)) == {}


def test_a_tainted_gpu_counts_toward_the_64_device_limit() -> None:
    inventory = many(100)
    assert len(build_slices(inventory, SliceOptions(DRIVER, "n1"), 1)) == 1
    slices = build_slices(inventory, SliceOptions(DRIVER, "n1"), 1, {5: health_after(5, 79)})
    assert [len(s["spec"]["devices"]) for s in slices] == [64, 36]


def test_a_gpu_discovery_could_not_read_keeps_its_taint() -> None:
    inventory = many(2, health_error="nvmlDeviceGetMemoryInfo: GPU is lost")
    inventory = replace(inventory, gpus=(inventory.gpus[0], replace(inventory.gpus[1],
                                                                    health_error=None)))
    slices = build_slices(inventory, SliceOptions(DRIVER, "n1"), 1, {1: GpuHealth(1)})
    assert taints_by_device(slices) == {
        "gpu-0": [{"key": f"{DRIVER}/unhealthy", "effect": "NoSchedule"}]}
