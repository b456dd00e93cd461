"""Topology mode places a MIG profile where it rules out the least that larger
profiles could still take on that GPU (dynamic MIG on the mock machines' GPUs: one
GPU left free of whole-GPU claims, the others held whole)."""

from __future__ import annotations

import random
from functools import cache
from typing import Any

import pytest

from driver.allocator import Allocator, Ledger, Outcome, driver_classes
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices

DRIVER = "gpu.dra.dev"
NODE = "n1"
BACKENDS = ["reference", "native"]
# machine profile -> its GPU's profiles by size: 1g, 1g with two memory slices, 2g, 3g, 4g
MACHINES = {
    "a100-pcie-4x": ("1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb"),  # A100 40 GB
    "dgx-a100": ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb"),  # A100 80 GB
    "h100-80gb-hbm3": ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb"),
    "h200-141gb": ("1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb"),
}


@cache
def _slices(machine: str) -> tuple[dict[str, Any], ...]:
    inventory = discover(mock_provider(machine))
    return tuple(build_slices(inventory, SliceOptions(driver=DRIVER, node=NODE,
                                                      mig_mode="dynamic"), generation=1))


def _claim(name: str, profile: str) -> dict[str, Any]:
    selector = f'device.attributes["{DRIVER}"].profile == "{profile}"'
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"devices": {"requests": [
        {"name": "r", "exactly": {"deviceClassName": f"mig.{DRIVER}", "count": 1,
                                  "selectors": [{"cel": {"expression": selector}}]}}]}}}


def _held(name: str, *devices: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"}, "status": {"allocation": {
        "devices": {"results": [{"request": "r", "driver": DRIVER, "pool": NODE, "device": d}
                                for d in devices]}}}}


def _gpu0_with(machine: str, device: str) -> Ledger:
    """gpu-0 holds `device`; every other GPU of the machine is held whole."""
    others = sorted({d["name"] for s in _slices(machine) for d in s["spec"].get("devices") or []
                     if "-mig-" not in d["name"] and d["name"] != "gpu-0"})
    return Ledger.of([_held("old", device), *([_held("whole", *others)] if others else [])])


def _allocate(machine: str, ledger: Ledger, name: str, profile: str, backend: str
              ) -> Outcome:
    allocator = Allocator(list(_slices(machine)), driver_classes(DRIVER))
    outcome = allocator.allocate(allocator.parse([_claim(name, profile)]), ledger, NODE,
                                 "topology", backend)  # type: ignore[arg-type]
    if outcome.status == "allocated":
        ledger.add(f"ns/{name}", outcome.allocations[0]["devices"]["results"])
    return outcome


def _device(outcome: Outcome) -> str:
    assert outcome.status == "allocated", outcome.message
    return str(outcome.allocations[0]["devices"]["results"][0]["device"])


def _compact(profile: str) -> str:
    return profile.replace(".", "")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("held, small", [(4, 0), (3, 1)],
                         ids=["1g next to a 4g", "two-slice 1g next to a 3g"])
def test_a_small_profile_next_to_a_large_one_leaves_room_for_a_2g(
        machine: str, backend: str, held: int, small: int) -> None:
    """Slices 0-3 taken (a 4g or a 3g at 0): a small profile at 4 would rule out the 2g
    at 4 and the 3g at 4, at 6 only the 3g at 4; so the 2g that comes next still fits."""
    profiles = MACHINES[machine]
    ledger = _gpu0_with(machine, f"gpu-0-mig-{_compact(profiles[held])}-0")
    assert _device(_allocate(machine, ledger, "small", profiles[small], backend)) == \
        f"gpu-0-mig-{_compact(profiles[small])}-6"
    assert _device(_allocate(machine, ledger, "next", profiles[2], backend)) == \
        f"gpu-0-mig-{_compact(profiles[2])}-4"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_1g_on_a_free_gpu_takes_the_slice_that_blocks_least(backend: str) -> None:
    """Every placement on slice 6 or 7 is worth less than on 0-5: a 1g there keeps the
    4g, a 3g and three 2g placements possible."""
    ledger = Ledger()
    assert _device(_allocate("h100-80gb-hbm3", ledger, "small", "1g.10gb", backend)) == \
        "gpu-0-mig-1g10gb-6"
    twos = {_device(_allocate("h100-80gb-hbm3", ledger, f"two-{i}", "2g.20gb", backend))
            for i in range(3)}
    assert twos == {f"gpu-0-mig-2g20gb-{start}" for start in (0, 2, 4)}


@pytest.mark.parametrize("machine", ["h100-80gb-hbm3", "a100-pcie-4x"])
def test_the_kernel_places_as_the_reference_along_random_arrivals(machine: str) -> None:
    """Where the MIG score decides: every profile (and whole GPUs) arriving and leaving
    at random, each claim placed by both searches from the same ledger."""
    allocator = Allocator(list(_slices(machine)), driver_classes(DRIVER))
    profiles = sorted({d["attributes"]["profile"]["string"] for s in _slices(machine)
                       for d in s["spec"].get("devices") or [] if "-mig-" in d["name"]})
    rng = random.Random(machine)
    ledger = Ledger()
    live: list[str] = []
    placed = 0
    for step in range(120):
        if live and rng.random() < 0.4:
            ledger.remove(live.pop(rng.randrange(len(live))))
            continue
        claim = allocator.parse([_claim(f"c{step}", rng.choice(profiles))])
        native = allocator.allocate(claim, ledger, NODE, "topology", "native")
        reference = allocator.allocate(claim, ledger, NODE, "topology", "reference")
        assert native.allocations == reference.allocations, f"step {step}"
        if native.status == "allocated":
            ledger.add(f"ns/c{step}", native.allocations[0]["devices"]["results"])
            live.append(f"ns/c{step}")
            placed += 1
    assert placed > 30
