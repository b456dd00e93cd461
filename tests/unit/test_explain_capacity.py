"""`explain` on consumable capacity (KEP-5075): which devices a request's capacity leaves
out and why, by the allocator's own rounding and what earlier claims consume, and the
largest amount that would fit."""

from __future__ import annotations

from typing import Any

import pytest

from driver.allocator import Allocator, Ledger
from driver.allocator.allocate import driver_classes
from driver.allocator.explain import Explanation, explain, explain_all
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices

DRIVER = "gpu.dra.dev"
CLASSES = driver_classes(DRIVER)


def claim(name: str, count: int = 1, **capacity: str) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": DRIVER, "count": count}
    if capacity:
        exactly["capacity"] = {"requests": capacity}
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}


@pytest.fixture(scope="module")
def h100s() -> Allocator:
    """A DGX H100's eight GPUs as consumable mode publishes them: 81559Mi each."""
    options = SliceOptions(DRIVER, "node-1", gpu_sharing="consumable")
    return Allocator(build_slices(discover(mock_provider("dgx-h100")), options, 1), CLASSES)


def gpu(name: str, memory: str) -> dict[str, Any]:
    return {"name": name, "allowMultipleAllocations": True,
            "attributes": {"type": {"string": "gpu"}},
            "capacity": {"memory": {"value": memory, "requestPolicy": {
                "default": memory, "validRange": {"min": "1Gi", "step": "1Gi"}}}}}


def small() -> Allocator:
    """Two shared GPUs of 80Gi and 40Gi, asked for in whole Gi."""
    slices = [{"metadata": {"name": "s"}, "spec": {
        "driver": DRIVER, "nodeName": "node-1",
        "pool": {"name": "node-1", "generation": 1, "resourceSliceCount": 1},
        "devices": [gpu("gpu-0", "80Gi"), gpu("gpu-1", "40Gi")]}}]
    return Allocator(slices, CLASSES)


def why(allocator: Allocator, wanted: dict[str, Any]) -> Explanation:
    return explain(allocator, allocator.parse([wanted])[0], Ledger.of([]), "node-1")


def test_more_memory_than_any_gpu_has_names_the_gpus_and_the_most_that_fits(
        h100s: Allocator) -> None:
    got = why(h100s, claim("big", memory="90Gi"))
    assert not got.fits
    assert got.reasons == (
        "request gpu: 8 devices match class gpu.dra.dev; 8 left out by capacity; "
        "0 free for 1",
        "gpu-0: memory 90Gi asked, more than its 81559Mi",
        "gpu-1: memory 90Gi asked, more than its 81559Mi",
        "gpu-2: memory 90Gi asked, more than its 81559Mi",
        "gpu-3: memory 90Gi asked, more than its 81559Mi",
        "and 4 more devices left out by capacity")
    assert got.nearest == ("request gpu: memory at most 81559Mi instead of 90Gi",)


def test_a_compute_share_outside_the_request_policy_is_named_with_the_policy(
        h100s: Allocator) -> None:
    got = why(h100s, claim("hungry", compute="150"))
    assert got.reasons[1] == ("gpu-0: compute 150 asked, outside its request policy "
                              "(validRange 0..100 step 1)")
    assert got.nearest == ("request gpu: compute at most 100 instead of 150",)


def test_what_earlier_claims_consume_is_counted_and_the_ask_rounded_as_the_allocator_does(
        ) -> None:
    allocator = small()
    claims = allocator.parse([claim("a", memory="30Gi"), claim("b", memory="30Gi"),
                              claim("c", memory="30Gi"), claim("d", memory="20.5Gi")])
    done = explain_all(allocator, claims, Ledger.of([]), ["node-1"])
    assert [e.fits for e in done] == [True, True, True, False]
    late = done[3]
    # 20.5Gi is rounded up onto the 1Gi step: 21Gi, more than either GPU has left
    assert late.reasons == (
        "request gpu: 2 devices match class gpu.dra.dev; 2 left out by capacity; 0 free for 1",
        "gpu-0: memory 20992Mi asked (rounded up to 21Gi by its request policy), 80Gi in all, "
        "60Gi consumed by 2 claims, 20Gi free",
        "gpu-1: memory 20992Mi asked (rounded up to 21Gi by its request policy), 40Gi in all, "
        "30Gi consumed by 1 claim, 10Gi free")
    assert late.nearest[0] == "request gpu: memory at most 20Gi instead of 20992Mi"
    assert "after default/a is released" in late.nearest


def test_a_claim_asking_no_memory_takes_the_default_all_of_it() -> None:
    allocator = small()
    claims = allocator.parse([claim("a", memory="30Gi"), claim("b", memory="30Gi"),
                              claim("c", memory="30Gi"), claim("whole")])
    late = explain_all(allocator, claims, Ledger.of([]), ["node-1"])[3]
    assert late.reasons[1:] == (
        "gpu-0: memory not asked (default 80Gi), 80Gi in all, 60Gi consumed by 2 claims, "
        "20Gi free",
        "gpu-1: memory not asked (default 40Gi), 40Gi in all, 30Gi consumed by 1 claim, "
        "10Gi free")
    assert late.nearest[0] == "request gpu: memory at most 20Gi instead of the default"


def test_several_devices_need_the_amount_that_fits_on_as_many_of_them() -> None:
    allocator = small()
    claims = allocator.parse([claim("a", memory="50Gi"), claim("pair", 2, memory="35Gi")])
    late = explain_all(allocator, claims, Ledger.of([]), ["node-1"])[1]
    assert late.reasons == (
        "request gpu: 2 devices match class gpu.dra.dev; 1 left out by capacity; 1 free for 2",
        "gpu-0: memory 35Gi asked, 80Gi in all, 50Gi consumed by 1 claim, 30Gi free")
    assert "request gpu: memory at most 30Gi instead of 35Gi" in late.nearest
