"""Consumable mode (`--gpu-sharing consumable`): whole GPUs published for several claims to
share by memory and compute share, with request policies the API accepts."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from driver.inventory.discovery import discover
from driver.kube.quantity import parse_quantity
from driver.nvml.mock import list_profiles, mock_provider
from driver.resourceslice.build import SliceOptions, build_slices, limit_violations

GIB, MIB = 1 << 30, 1 << 20


def devices(profile: str, sharing: str = "consumable") -> list[dict[str, Any]]:
    options = SliceOptions("gpu.dra.dev", "node-1", gpu_sharing=sharing)  # type: ignore[arg-type]
    slices = build_slices(discover(mock_provider(profile)), options, 1)
    assert limit_violations(slices) == []
    return [d for s in slices for d in s["spec"].get("devices", [])]


def q(text: str) -> Fraction:
    return parse_quantity(text)


def policy_problems(capacity: dict[str, Any]) -> list[str]:
    """resource.k8s.io/v1's rules for a DeviceCapacity's requestPolicy with a validRange."""
    value, policy = q(capacity["value"]), capacity["requestPolicy"]
    default, valid = q(policy["default"]), policy["validRange"]
    low = q(valid["min"])
    high = q(valid["max"]) if "max" in valid else value
    step = q(valid["step"]) if "step" in valid else None
    problems = []
    if not low <= high <= value:
        problems.append("min <= max <= value")
    if not low <= default <= high:
        problems.append("default within the range")
    if step is not None and (default - low) % step:
        problems.append("default on the step grid")
    return problems


def test_an_h100_is_shared_by_memory_in_mib_and_a_compute_percentage() -> None:
    gpu = devices("dgx-h100")[0]
    assert gpu["name"] == "gpu-0" and gpu["allowMultipleAllocations"] is True
    memory, compute = gpu["capacity"]["memory"], gpu["capacity"]["compute"]
    assert q(memory["value"]) == 81559 * MIB
    # a claim that asks for no memory takes all of it: the GPU is its alone
    assert memory["requestPolicy"] == {"default": memory["value"], "validRange": {
        "min": str(GIB), "step": str(MIB)}}
    # a claim that asks for no compute share reserves none (and is not limited)
    assert compute == {"value": "100", "requestPolicy": {
        "default": "0", "validRange": {"min": "0", "max": "100", "step": "1"}}}


@pytest.mark.parametrize("profile", list_profiles())
def test_every_shared_gpus_policies_follow_the_api_rules(profile: str) -> None:
    shared = [d for d in devices(profile) if d.get("allowMultipleAllocations")]
    for device in shared:
        for name, capacity in device["capacity"].items():
            assert policy_problems(capacity) == [], (profile, device["name"], name)
    assert all("consumesCounters" not in d for d in devices(profile))


def test_exclusive_mode_publishes_no_shares() -> None:
    for device in devices("dgx-h100", "exclusive"):
        assert "allowMultipleAllocations" not in device
        assert device["capacity"] == {"memory": {"value": device["capacity"]["memory"]["value"]}}


def test_mig_devices_stay_whole_and_only_gpus_without_mig_are_shared() -> None:
    published = devices("a100-mig")
    mig = [d for d in published if d["attributes"]["type"]["string"] == "mig"]
    gpus = [d for d in published if d["attributes"]["type"]["string"] == "gpu"]
    assert mig and all("allowMultipleAllocations" not in d for d in mig)
    assert all(d["allowMultipleAllocations"] for d in gpus)


def test_consumable_sharing_and_dynamic_mig_are_refused_together() -> None:
    with pytest.raises(ValueError, match=r"--gpu-sharing consumable .* --mig-mode dynamic"):
        SliceOptions("gpu.dra.dev", "node-1", "dynamic", gpu_sharing="consumable")
