"""Topology mode places claims better than the scheduler's first fit, on a fixed
random sequence of arrivals and releases (numbers recorded in docs/benchmarks.md).

- NVLink: of the claims for two whole GPUs (no constraint asked), how many got two
  GPUs of one NVLink island.
- Stranded MIG slices: free memory slices, summed over the sequence's steps, that no
  MIG profile bigger than 1g can use any more (not inside a free aligned pair).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest

from driver.allocator import Allocator, Ledger, driver_classes
from driver.allocator.pools import Node
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices

NODE = "node-1"
STEPS = 300
MACHINES = [("dgx-h100", "dynamic"), ("a100-pcie-4x", "dynamic"), ("mesh-4x", "static")]


@dataclass
class Quality:
    pairs: int = 0
    connected_pairs: int = 0
    stranded: int = 0
    rejected: int = 0

    def row(self) -> str:
        return (f"{self.connected_pairs}/{self.pairs} two-GPU claims NVLink-connected, "
                f"{self.stranded} stranded MIG slice-steps, {self.rejected} claims rejected")


def _claim(name: str, kind: str) -> dict[str, Any]:
    if kind.startswith("mig"):
        profile = kind.split("-", 1)[1]
        request = {"deviceClassName": "mig.gpu.dra.dev", "count": 1, "selectors": [{"cel": {
            "expression": f'device.attributes["gpu.dra.dev"].profile.startsWith("{profile}.")'}}]}
    else:
        request = {"deviceClassName": "gpu.dra.dev", "count": int(kind[0])}
    return {"metadata": {"name": name, "namespace": "q"},
            "spec": {"devices": {"requests": [{"name": "r", "exactly": request}]}}}


@cache
def _slices(profile: str, mig_mode: str) -> tuple[dict[str, Any], ...]:
    return tuple(build_slices(discover(mock_provider(profile)),
                              SliceOptions(driver="gpu.dra.dev", node=NODE, mig_mode=mig_mode),
                              generation=1))


def simulate(profile: str, mig_mode: str, mode: str, seed: int = 7) -> Quality:
    allocator = Allocator(list(_slices(profile, mig_mode)), driver_classes("gpu.dra.dev"))
    kinds = ["1-gpu", "2-gpu"] + (["mig-1g"] * 3 + ["mig-2g", "mig-3g"]
                                  if mig_mode == "dynamic" else [])
    rng = random.Random(f"{profile}-{seed}")
    ledger = Ledger()
    live: list[str] = []
    island = {d["name"]: d["attributes"].get("nvlinkIsland", {}).get("int")
              for s in allocator.slices for d in s["spec"].get("devices") or []}
    quality = Quality()
    for step in range(STEPS):
        if live and rng.random() < 0.4:
            ledger.remove(live.pop(rng.randrange(len(live))))
        else:
            kind = rng.choice(kinds)
            claim = allocator.parse([_claim(f"c{step}", kind)])[0]
            outcome = allocator.allocate([claim], ledger, NODE, mode)  # type: ignore[arg-type]
            if outcome.status != "allocated":
                quality.rejected += 1
            else:
                results = outcome.allocations[0]["devices"]["results"]
                ledger.add(claim.key, results)
                live.append(claim.key)
                if kind == "2-gpu":
                    quality.pairs += 1
                    islands = {island[r["device"]] for r in results}
                    quality.connected_pairs += len(islands) == 1 and None not in islands
        quality.stranded += _stranded(allocator, ledger)
    return quality


def _stranded(allocator: Allocator, ledger: Ledger) -> int:
    """Free memory slices outside every free aligned pair, on each GPU."""
    pool = allocator.pools(Node(NODE))[0]
    taken: dict[str, set[int]] = {}
    for device in pool.devices:
        if ledger.allocated(device.ref):
            for counter_set, counter, _ in device.consumes:
                if counter.startswith("memory-slice-"):
                    taken.setdefault(counter_set, set()).add(int(counter[13:]))
    stranded = 0
    for counter_set, counters in pool.counters.items():
        slots = sorted(int(c[13:]) for c in counters if c.startswith("memory-slice-"))
        free = [s for s in slots if s not in taken.get(counter_set, set())]
        if len(free) == len(slots):
            continue
        pairs = {s for s in free if s % 2 == 0 and s + 1 in free} | \
                {s for s in free if s % 2 == 1 and s - 1 in free}
        stranded += len(free) - len(pairs)
    return stranded


@pytest.mark.parametrize("profile, mig_mode", MACHINES)
def test_topology_mode_places_at_least_as_well_as_first_fit(profile: str, mig_mode: str
                                                            ) -> None:
    parity = simulate(profile, mig_mode, "parity")
    topology = simulate(profile, mig_mode, "topology")
    print(f"\n{profile} ({mig_mode}) parity:   {parity.row()}"
          f"\n{profile} ({mig_mode}) topology: {topology.row()}")
    assert topology.pairs and parity.pairs
    assert topology.connected_pairs / topology.pairs >= parity.connected_pairs / parity.pairs
    assert topology.stranded <= parity.stranded


def test_topology_mode_is_strictly_better_where_the_machine_allows_it() -> None:
    parity = simulate("a100-pcie-4x", "dynamic", "parity")
    topology = simulate("a100-pcie-4x", "dynamic", "topology")
    assert topology.connected_pairs / topology.pairs > parity.connected_pairs / parity.pairs
    mesh_parity = simulate("mesh-4x", "static", "parity")
    mesh_topology = simulate("mesh-4x", "static", "topology")
    assert mesh_topology.connected_pairs / mesh_topology.pairs > \
        mesh_parity.connected_pairs / mesh_parity.pairs
    dgx_parity = simulate("dgx-h100", "dynamic", "parity")
    dgx_topology = simulate("dgx-h100", "dynamic", "topology")
    assert dgx_topology.stranded < dgx_parity.stranded
