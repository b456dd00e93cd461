"""Topology mode places claims better than the scheduler's first fit, on a fixed
random sequence of arrivals and releases (numbers recorded in docs/benchmarks.md).

- NVLink: of the claims for two whole GPUs (no constraint asked), how many got two
  GPUs of one NVLink island.
- Stranded MIG slices: free memory slices, summed over the sequence's steps, that no
  MIG profile bigger than 1g can use any more (not inside a free aligned pair: on these
  GPUs the placements of 2 memory slices are the aligned pairs).
- Rejected claims, and of them those for 2 memory slices or more (the larger profiles a
  badly placed small one blocks).

The second set of sequences mixes every MIG profile of each MIG-capable GPU (A100 40 GB,
A100 80 GB, H100, H200) with releases, over several seeds.
"""

from __future__ import annotations

import os
import random
from dataclasses import astuple, dataclass
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
# every MIG-capable GPU: A100 40 GB, A100 80 GB, H100 80 GB, H200 141 GB
MIG_MACHINES = ["a100-pcie-4x", "dgx-a100", "dgx-h100", "h200-141gb"]
# docs/benchmarks.md has GPU_DRA_QUALITY_SEEDS=20; CI runs the default
SEEDS = range(1, 1 + int(os.environ.get("GPU_DRA_QUALITY_SEEDS", "5")))
LIFETIME = 4  # steps per GPU of the machine, at most


@dataclass
class Quality:
    pairs: int = 0
    connected_pairs: int = 0
    stranded: int = 0
    rejected: int = 0
    rejected_large: int = 0  # MIG claims for 2 memory slices or more
    claims: int = 0

    def row(self) -> str:
        return (f"{self.connected_pairs}/{self.pairs} two-GPU claims NVLink-connected, "
                f"{self.stranded} stranded MIG slice-steps, {self.rejected} of "
                f"{self.claims} claims rejected ({self.rejected_large} for 2+ slices)")

    def __add__(self, other: Quality) -> Quality:
        return Quality(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def _claim(name: str, kind: str) -> dict[str, Any]:
    """kind: "1-gpu", "2-gpu", "mig-1g" (any 1g profile), "mig=1g.10gb" (that one)."""
    if kind.startswith("mig"):
        profile = kind[4:]
        test = (f'== "{profile}"' if kind[3] == "=" else f'.startsWith("{profile}.")')
        request = {"deviceClassName": "mig.gpu.dra.dev", "count": 1, "selectors": [{"cel": {
            "expression": f'device.attributes["gpu.dra.dev"].profile {test}'}}]}
    else:
        request = {"deviceClassName": "gpu.dra.dev", "count": int(kind[0])}
    return {"metadata": {"name": name, "namespace": "q"},
            "spec": {"devices": {"requests": [{"name": "r", "exactly": request}]}}}


@cache
def _slices(profile: str, mig_mode: str) -> tuple[dict[str, Any], ...]:
    return tuple(build_slices(discover(mock_provider(profile)),
                              SliceOptions(driver="gpu.dra.dev", node=NODE, mig_mode=mig_mode),
                              generation=1))


def _profiles(profile: str) -> list[str]:
    """Every MIG profile the machine's GPUs offer, as claim kinds."""
    return sorted({f"mig={d['attributes']['profile']['string']}"
                   for s in _slices(profile, "dynamic") for d in s["spec"].get("devices") or []
                   if d["attributes"]["type"]["string"] == "mig"})


def arrivals(profile: str, seed: int, kinds: list[str], gpus: int
             ) -> list[tuple[str, int]]:
    """One claim arriving per step: its kind and the step it leaves at (if placed), a
    lifetime of up to LIFETIME steps per GPU: the same sequence for every mode."""
    rng = random.Random(f"{profile}-{seed}")
    return [(rng.choice(kinds), step + rng.randint(1, LIFETIME * gpus))
            for step in range(STEPS)]


def simulate(profile: str, mig_mode: str, mode: str, seed: int,
             kinds: list[str] | None = None) -> Quality:
    allocator = Allocator(list(_slices(profile, mig_mode)), driver_classes("gpu.dra.dev"))
    if kinds is None:
        kinds = ["1-gpu", "2-gpu"] + (["mig-1g"] * 3 + ["mig-2g", "mig-3g"]
                                      if mig_mode == "dynamic" else [])
    devices = [d for s in allocator.slices for d in s["spec"].get("devices") or []]
    island = {d["name"]: d["attributes"].get("nvlinkIsland", {}).get("int") for d in devices}
    sizes = {d["attributes"]["profile"]["string"]: sum(
        c.startswith("memory-slice-") for use in d["consumesCounters"] for c in use["counters"])
        for d in devices
        if d["attributes"]["type"]["string"] == "mig" and d.get("consumesCounters")}
    gpus = sum(d["attributes"]["type"]["string"] == "gpu" for d in devices)
    ledger = Ledger()
    leaves: dict[str, int] = {}
    quality = Quality()
    for step, (kind, leave) in enumerate(arrivals(profile, seed, kinds, gpus)):
        for key in [key for key, at in leaves.items() if at <= step]:
            ledger.remove(key)
            del leaves[key]
        claim = allocator.parse([_claim(f"c{step}", kind)])[0]
        outcome = allocator.allocate([claim], ledger, NODE, mode)  # type: ignore[arg-type]
        quality.claims += 1
        if outcome.status != "allocated":
            quality.rejected += 1
            quality.rejected_large += _memory_slices(kind, sizes) >= 2
        else:
            results = outcome.allocations[0]["devices"]["results"]
            ledger.add(claim.key, results)
            leaves[claim.key] = leave
            if kind == "2-gpu":
                quality.pairs += 1
                islands = {island[r["device"]] for r in results}
                quality.connected_pairs += len(islands) == 1 and None not in islands
        quality.stranded += _stranded(allocator, ledger)
    return quality


def _memory_slices(kind: str, sizes: dict[str, int]) -> int:
    """The fewest memory slices a claim of `kind` takes (0: not a MIG claim)."""
    if not kind.startswith("mig"):
        return 0
    wanted = kind[4:]
    return min(n for profile, n in sizes.items()
               if profile == wanted or (kind[3] == "-" and profile.startswith(f"{wanted}.")))


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


@cache
def over_seeds(profile: str, mig_mode: str, mode: str, every_profile: bool = False
               ) -> Quality:
    """The sum over SEEDS; every_profile: claims for each of the machine's MIG profiles
    (exactly that profile) instead of the whole-GPU and 1g/2g/3g mix."""
    kinds = _profiles(profile) if every_profile else None
    return sum((simulate(profile, mig_mode, mode, seed, kinds) for seed in SEEDS), Quality())


def _compare(profile: str, mig_mode: str, every_profile: bool = False
             ) -> tuple[Quality, Quality]:
    parity, topology = (over_seeds(profile, mig_mode, mode, every_profile)
                        for mode in ("parity", "topology"))
    what = "every MIG profile" if every_profile else mig_mode
    print(f"\n{profile} ({what}, seeds {SEEDS.start}-{SEEDS.stop - 1})"
          f"\n  parity:   {parity.row()}\n  topology: {topology.row()}")
    assert topology.claims == parity.claims
    return parity, topology


@pytest.mark.parametrize("profile, mig_mode", MACHINES)
def test_topology_mode_rejects_no_more_claims_than_first_fit(profile: str, mig_mode: str
                                                             ) -> None:
    parity, topology = _compare(profile, mig_mode)
    assert topology.pairs and parity.pairs
    assert topology.rejected <= parity.rejected


def test_topology_mode_is_strictly_better_where_the_machine_allows_it() -> None:
    mesh_parity, mesh_topology = _compare("mesh-4x", "static")
    assert mesh_topology.connected_pairs / mesh_topology.pairs > \
        mesh_parity.connected_pairs / mesh_parity.pairs
    dgx_parity, dgx_topology = _compare("dgx-h100", "dynamic")
    assert dgx_topology.connected_pairs / dgx_topology.pairs >= \
        dgx_parity.connected_pairs / dgx_parity.pairs
    assert dgx_topology.stranded < dgx_parity.stranded


@pytest.mark.parametrize("profile", MIG_MACHINES)
def test_every_mig_profile_arriving_is_rejected_less_than_with_first_fit(profile: str
                                                                         ) -> None:
    """The larger profiles are what a badly placed small one blocks."""
    parity, topology = _compare(profile, "dynamic", every_profile=True)
    assert topology.rejected_large < parity.rejected_large
    assert topology.rejected < parity.rejected
