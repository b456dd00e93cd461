"""The allocator answers as the v1.37 scheduler does, on small hand-made pools.

Each case runs on both searches (the Python reference and the native kernel); the
reference also counts the search steps upstream's own tests pin.
"""

from __future__ import annotations

from typing import Any

import pytest

from driver.allocator import Allocator, InputError, Ledger, Outcome, prepare_conflicts
from driver.allocator.ledger import DeviceRef
from driver.allocator.pools import Node, gather_pools

DRIVER = "d.example.com"
BACKENDS = ["reference", "native"]


def device(name: str, **attrs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "attributes": {}}
    for key, value in attrs.items():
        if key in ("taints", "consumesCounters", "capacity", "allowMultipleAllocations"):
            out[key] = value
        else:
            kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) \
                else "string"
            out["attributes"][key] = {kind: value}
    return out


def pool_slice(name: str, devices: list[dict[str, Any]], pool: str = "p1", count: int = 1,
               generation: int = 1, driver: str = DRIVER, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {
        "driver": driver, "nodeName": "n1", "devices": devices,
        "pool": {"name": pool, "generation": generation, "resourceSliceCount": count}, **spec}}


CLASSES = [{"metadata": {"name": "c"},
            "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]}}]


def request(name: str, count: int = 1, **fields: Any) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": "c", **fields}
    if fields.get("allocationMode") != "All":
        exactly["count"] = count
    return {"name": name, "exactly": exactly}


def claim(name: str, *requests: dict[str, Any], constraints: list[Any] | None = None
          ) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"devices": {"requests": list(requests),
                                 "constraints": constraints or []}}}


def run(slices: list[dict[str, Any]], claims: list[dict[str, Any]], backend: str,
        allocated: list[dict[str, Any]] | None = None, mode: str = "parity") -> Outcome:
    allocator = Allocator(slices, CLASSES)
    return allocator.allocate(allocator.parse(claims), Ledger.of(allocated or []), "n1",
                              mode=mode, backend=backend)  # type: ignore[arg-type]


def picked(outcome: Outcome) -> list[list[tuple[str, str]]]:
    assert outcome.status == "allocated", outcome.message
    return [[(r["request"], r["device"]) for r in a["devices"]["results"]]
            for a in outcome.allocations]


def allocated_claim(name: str, *devices: str, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"},
            "status": {"allocation": {"devices": {"results": [
                {"request": "r", "driver": DRIVER, "pool": "p1", "device": d, **extra}
                for d in devices]}}}}


FOUR = [pool_slice("s1", [device(f"dev-{i}", numa=i // 2, model="x") for i in range(4)])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_five_of_four_is_unschedulable_after_every_combination(backend: str) -> None:
    outcome = run(FOUR, [claim("a", request("r", 5))], backend)
    assert outcome.status == "unschedulable"
    if backend == "reference":
        # All 2^4 subsets, the step count upstream's test pins for this allocator.
        assert outcome.nodes == 16
    else:
        assert outcome.nodes < 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_fit_in_pool_slice_and_device_order(backend: str) -> None:
    slices = [pool_slice("b-slice", [device("z")], pool="pool-b"),
              pool_slice("s2", [device("y")], count=2),
              pool_slice("s1", [device("x")], count=2)]
    outcome = run(slices, [claim("a", request("r", 3))], backend)
    assert picked(outcome) == [[("r", "x"), ("r", "y"), ("r", "z")]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_attribute_across_requests_backtracks(backend: str) -> None:
    slices = [pool_slice("s1", [device(f"dev-{i}", numa=n) for i, n in enumerate((0, 0, 1, 1, 1))])]
    outcome = run(slices, [claim("a", request("one"), request("two", 2),
                                 constraints=[{"matchAttribute": f"{DRIVER}/numa"}])], backend)
    assert picked(outcome) == [[("one", "dev-2"), ("two", "dev-3"), ("two", "dev-4")]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_distinct_attribute(backend: str) -> None:
    outcome = run(FOUR, [claim("a", request("r", 2),
                               constraints=[{"distinctAttribute": f"{DRIVER}/numa"}])], backend)
    assert picked(outcome) == [[("r", "dev-0"), ("r", "dev-2")]]
    outcome = run(FOUR, [claim("a", request("r", 3),
                               constraints=[{"distinctAttribute": f"{DRIVER}/numa"}])], backend)
    assert outcome.status == "unschedulable"


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_available_falls_back_and_names_the_subrequest(backend: str) -> None:
    big = {"name": "big", "firstAvailable": [
        {"name": "four", "deviceClassName": "c", "count": 4},
        {"name": "two", "deviceClassName": "c", "count": 2}]}
    outcome = run(FOUR, [claim("a", big)], backend, [allocated_claim("old", "dev-3")])
    assert picked(outcome) == [[("big/two", "dev-0"), ("big/two", "dev-1")]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_takes_every_match_and_fails_if_one_is_taken(backend: str) -> None:
    every = request("r", allocationMode="All",
                    selectors=[{"cel": {"expression": f'device.attributes["{DRIVER}"].numa == 1'}}])
    assert picked(run(FOUR, [claim("a", every)], backend)) == [[("r", "dev-2"), ("r", "dev-3")]]
    taken = run(FOUR, [claim("a", every)], backend, [allocated_claim("old", "dev-3")])
    assert taken.status == "unschedulable"


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_under_a_violated_constraint_is_an_error(backend: str) -> None:
    outcome = run(FOUR, [claim("a", request("r", allocationMode="All"),
                               constraints=[{"matchAttribute": f"{DRIVER}/numa"}])], backend)
    assert outcome.status == "error"
    assert "constraint would not be satisfied" in outcome.message


def test_all_with_an_incomplete_pool_is_an_error() -> None:
    slices = [pool_slice("s1", [device("x")], count=2)]
    outcome = run(slices, [claim("a", request("r", allocationMode="All"))], "native")
    assert outcome.status == "error" and "being updated" in outcome.message
    assert run(slices, [claim("a", request("r"))], "native").status == "unschedulable"


@pytest.mark.parametrize("backend", BACKENDS)
def test_admin_access_takes_an_allocated_device(backend: str) -> None:
    outcome = run(FOUR, [claim("a", request("r", 4, adminAccess=True))], backend,
                  [allocated_claim("old", "dev-0")])
    results = outcome.allocations[0]["devices"]["results"]
    assert [r["device"] for r in results] == ["dev-0", "dev-1", "dev-2", "dev-3"]
    assert all(r["adminAccess"] is True for r in results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_taints_block_unless_tolerated(backend: str) -> None:
    slices = [pool_slice("s1", [
        device("bad", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}]),
        device("note", taints=[{"key": "k", "effect": "None"}]), device("ok")])]
    assert picked(run(slices, [claim("a", request("r", 2))], backend)) == \
        [[("r", "note"), ("r", "ok")]]
    tolerant = request("r", 3, tolerations=[{"key": "k", "operator": "Exists"}])
    outcome = run(slices, [claim("a", tolerant)], backend)
    assert [d for _, d in picked(outcome)[0]] == ["bad", "note", "ok"]
    assert outcome.allocations[0]["devices"]["results"][0]["tolerations"] == \
        [{"key": "k", "operator": "Exists"}]


def _partitioned() -> list[dict[str, Any]]:
    """One GPU with 4 memory slices: whole (all 4), halves at 0 and 2, quarters."""
    def part(name: str, slots: range) -> dict[str, Any]:
        return device(name, consumesCounters=[{"counterSet": "gpu0", "counters": {
            f"slice-{i}": {"value": "1"} for i in slots}}])
    devices = [part("whole", range(4)), part("half-0", range(0, 2)), part("half-2", range(2, 4))]
    devices += [part(f"q-{i}", range(i, i + 1)) for i in range(4)]
    counters = {"metadata": {"name": "counters"}, "spec": {
        "driver": DRIVER, "nodeName": "n1",
        "pool": {"name": "p1", "generation": 1, "resourceSliceCount": 2},
        "sharedCounters": [{"name": "gpu0", "counters": {
            f"slice-{i}": {"value": "1"} for i in range(4)}}]}}
    return [counters, pool_slice("devices", devices, count=2)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_counters_keep_partitions_from_overlapping(backend: str) -> None:
    slices = _partitioned()
    outcome = run(slices, [claim("a", request("r", 3))], backend)
    assert [d for _, d in picked(outcome)[0]] == ["half-0", "q-2", "q-3"]
    outcome = run(slices, [claim("a", request("r"))], backend,
                  [allocated_claim("old", "q-1")])
    assert picked(outcome) == [[("r", "half-2")]]
    assert run(slices, [claim("a", request("r", 5))], backend).status == "unschedulable"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overdrawn_counter_blocks_the_pools_partitions(backend: str) -> None:
    outcome = run(_partitioned(), [claim("a", request("r"))], backend,
                  [allocated_claim("old", "whole", "q-0")])
    assert outcome.status == "unschedulable"


def _shared_device() -> list[dict[str, Any]]:
    return [pool_slice("s1", [device("nic", allowMultipleAllocations=True, capacity={
        "bandwidth": {"value": "100", "requestPolicy": {
            "default": "10", "validRange": {"min": "10", "max": "100", "step": "10"}}}})])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_device_serves_claims_until_its_capacity_is_spent(backend: str) -> None:
    wants = request("r", capacity={"requests": {"bandwidth": "35"}})
    outcome = run(_shared_device(), [claim("a", wants), claim("b", wants)], backend)
    results = [a["devices"]["results"][0] for a in outcome.allocations]
    assert [r["device"] for r in results] == ["nic", "nic"]
    assert [r["consumedCapacity"] for r in results] == [{"bandwidth": "40"}] * 2
    assert results[0]["shareID"] != results[1]["shareID"]
    used = [allocated_claim("old", "nic", shareID="u1", consumedCapacity={"bandwidth": "80"})]
    assert run(_shared_device(), [claim("a", wants)], backend, used).status == "unschedulable"
    assert run(_shared_device(), [claim("a", request("r"))], backend, used).status == \
        "allocated"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_selector_error_stops_only_when_the_search_reaches_it(backend: str) -> None:
    slices = [pool_slice("s1", [device("a", kind="x"), device("b")])]
    selector = [{"cel": {"expression": f'device.attributes["{DRIVER}"].kind == "x"'}}]
    assert picked(run(slices, [claim("a", request("r", selectors=selector))], backend)) == \
        [[("r", "a")]]
    outcome = run(slices, [claim("a", request("r", 2, selectors=selector))], backend)
    assert outcome.status == "error"
    assert "selector #0 on device d.example.com/p1/b" in outcome.message


def test_stale_generations_are_ignored() -> None:
    slices = [pool_slice("old", [device("gone")], generation=1),
              pool_slice("new", [device("here")], generation=2)]
    assert picked(run(slices, [claim("a", request("r"))], "native")) == [[("r", "here")]]


def test_duplicate_device_names_make_the_pool_invalid() -> None:
    slices = [pool_slice("s1", [device("x"), device("x")])]
    outcome = run(slices, [claim("a", request("r"))], "native")
    assert outcome.status == "error" and "duplicate device name x" in outcome.message


@pytest.mark.parametrize("backend", BACKENDS)
def test_topology_mode_prefers_one_numa_node(backend: str) -> None:
    slices = [pool_slice("s1", [device(f"g{i}", **{"resource.kubernetes.io/numaNode": n})
                                for i, n in enumerate((0, 1, 1))])]
    assert picked(run(slices, [claim("a", request("r", 2))], backend)) == \
        [[("r", "g0"), ("r", "g1")]]
    assert picked(run(slices, [claim("a", request("r", 2))], backend, mode="topology")) == \
        [[("r", "g1"), ("r", "g2")]]


@pytest.mark.parametrize("bad, message", [
    (request("r") | {"exactly": {"deviceClassName": "nope"}},
     "spec.devices.requests[0].exactly.deviceClassName: no DeviceClass nope"),
    (request("r", 0), "spec.devices.requests[0].exactly.count: must be an integer of at least 1"),
    (request("r", selectors=[{"cel": {"expression": "device.driver =="}}]),
     "spec.devices.requests[0].exactly.selectors[0].cel.expression: CEL compile error"),
    ({"name": "r", "firstAvailable": [
        {"name": f"s{i}", "deviceClassName": "c"} for i in range(9)]},
     "spec.devices.requests[0].firstAvailable: 1 to 8 subrequests"),
    ({"name": "R", "exactly": {"deviceClassName": "c"}}, "requests[0].name: 'R' is not a DNS"),
])
def test_bad_claims_name_the_claim_and_field(bad: dict[str, Any], message: str) -> None:
    allocator = Allocator(FOUR, CLASSES)
    with pytest.raises(InputError) as caught:
        allocator.parse([claim("bad", bad)])
    assert str(caught.value).startswith("ResourceClaim ns/bad: ")
    assert message in str(caught.value)


def test_more_than_32_devices_is_an_error_naming_the_field() -> None:
    outcome = run(FOUR, [claim("a", request("r", 33))], "native")
    assert outcome.status == "error"
    assert "exceeds the claim limit of 32" in outcome.message
    assert outcome.field == "spec.devices.requests[0].exactly.count"


def test_prepare_refuses_devices_and_counters_already_taken() -> None:
    pools = gather_pools(_partitioned(), Node("n1"))
    ledger = Ledger.of([allocated_claim("old", "half-0")])
    result = [{"request": "r", "driver": DRIVER, "pool": "p1", "device": "q-1"}]
    problems = prepare_conflicts(ledger, "ns/new", result, pools)
    assert problems == ["counter slice-1 of d.example.com/p1/gpu0 is overdrawn by 1 "
                        "(also held by half-0 (ns/old))"]
    taken = [{"request": "r", "driver": DRIVER, "pool": "p1", "device": "half-0"}]
    assert prepare_conflicts(ledger, "ns/new", taken, pools)[0] == \
        "device d.example.com/p1/half-0 is taken by ns/old"
    assert prepare_conflicts(ledger, "ns/old", taken, pools) == []
    free = [{"request": "r", "driver": DRIVER, "pool": "p1", "device": "q-3"}]
    assert prepare_conflicts(ledger, "ns/new", free, pools) == []


def test_prepare_refuses_a_share_id_on_a_device_held_whole_or_not_shareable() -> None:
    devices = FOUR[0]["spec"]["devices"] + _shared_device()[0]["spec"]["devices"]
    pools = gather_pools([pool_slice("s1", devices)], Node("n1"))
    ledger = Ledger.of([allocated_claim("old", "dev-0")])
    shared = [{"request": "r", "driver": DRIVER, "pool": "p1", "device": "dev-0",
               "shareID": "s1"}]
    assert prepare_conflicts(ledger, "ns/new", shared, pools) == [
        "device d.example.com/p1/dev-0 is taken by ns/old",
        "device d.example.com/p1/dev-0 does not allow multiple allocations: shareID s1 "
        "cannot be prepared"]
    on_free = [{**shared[0], "device": "dev-1"}]
    assert prepare_conflicts(ledger, "ns/new", on_free, pools) == [
        "device d.example.com/p1/dev-1 does not allow multiple allocations: shareID s1 "
        "cannot be prepared"]
    nic = [{**shared[0], "device": "nic"}]
    assert prepare_conflicts(Ledger.of([allocated_claim("old", "nic", shareID="s0")]),
                             "ns/new", nic, pools) == []
    assert prepare_conflicts(Ledger.of([allocated_claim("old", "nic")]), "ns/new", nic,
                             pools) == ["device d.example.com/p1/nic is taken by ns/old"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_devices_held_with_admin_access_stay_free_for_others(backend: str) -> None:
    held = [allocated_claim("monitor", "dev-0", "dev-1", adminAccess=True)]
    assert picked(run(FOUR, [claim("a", request("r"))], backend, held)) == [[("r", "dev-0")]]


def test_the_ledger_forgets_a_released_claim() -> None:
    ledger = Ledger.of([allocated_claim("old", "dev-0"),
                        allocated_claim("shared", "dev-1", shareID="s1",
                                        consumedCapacity={"bandwidth": "10"})])
    assert ledger.owner(ledger_ref("dev-0")) == "ns/old"
    assert ledger.allocated(ledger_ref("dev-1"))
    ledger.remove("ns/old")
    ledger.remove("ns/shared")
    assert not ledger.allocated(ledger_ref("dev-0"))
    assert not ledger.allocated(ledger_ref("dev-1"))
    assert ledger.capacity == {}


def ledger_ref(name: str) -> DeviceRef:
    return DeviceRef(DRIVER, "p1", name)
