"""The native kernel gives the pure-Python reference's answers on any problem.

Problems are drawn at the level the searches see (bitsets, counters, constraints,
firstAvailable, All, admin access, shared devices, selector errors), small enough
for the unpruned reference to finish; and as whole allocations (the differential
test's generated instances) through one warm `Allocator`, whose kernel path keeps
what it compiled across ledgers.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import asdict, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import driver._alloc
from driver.allocator import Allocator, InputError, Ledger, driver_classes
from driver.allocator import kernel as allocator_kernel
from driver.allocator import reference as allocator_ref
from driver.allocator.input import Claim, Request
from driver.allocator.ledger import DeviceRef
from driver.allocator.model import DISTINCT, MATCH, ConstraintPlan, Entry, Problem
from driver.allocator.pools import Device, Node
from tests.support.oracle import normalized
from tests.support.problems import instance

BUDGET = 200_000


def test_kernel_is_the_compiled_extension() -> None:
    assert driver._alloc.__file__.endswith(".so")
    assert allocator_kernel._alloc is driver._alloc


def _request(name: str) -> Request:
    return Request(name, "c", (), False, 1, False, (), (), (), "spec")


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    n = draw(st.integers(1, 9))
    devices = [Device(DeviceRef("d", "p", f"x{i}"), {}, {}, {}, (), False, False, True)
               for i in range(n)]
    bitset = st.integers(0, (1 << n) - 1)
    multi = draw(st.lists(st.booleans(), min_size=n, max_size=n)) if draw(st.booleans()) \
        else [False] * n
    n_counters = draw(st.integers(0, 3))
    counted = [n_counters > 0 and draw(st.booleans()) for _ in range(n)]
    dev_counters = [[(k, draw(st.integers(0, 3))) for k in range(n_counters)
                     if draw(st.booleans())] if counted[i] else [] for i in range(n)]
    counter_avail = [draw(st.integers(-1, 9)) for _ in range(n_counters)]
    dims: list[list[int]] = []
    dim_avail: list[int] = []
    for i in range(n):
        if multi[i]:
            dims.append([len(dim_avail)])
            dim_avail.append(draw(st.integers(0, 6)))
        else:
            dims.append([])
    entries: list[Entry] = []
    claims: list[list[list[int]]] = []
    constraints: list[list[ConstraintPlan]] = []
    for c in range(draw(st.integers(1, 2))):
        groups: list[list[int]] = []
        n_cons = draw(st.integers(0, 2))
        for g in range(draw(st.integers(1, 2))):
            first_available = draw(st.integers(0, 3)) == 0
            alts = draw(st.integers(2, 3)) if first_available else 1
            ids = []
            for a in range(alts):
                all_mode = draw(st.integers(0, 6)) == 0
                admin = not first_available and draw(st.integers(0, 6)) == 0
                cand = draw(bitset) | draw(bitset)
                err = draw(bitset) & ~cand if draw(st.integers(0, 9)) == 0 else 0
                entry = Entry(c, g, a, _request(f"r{g}/s{a}" if first_available
                                                      else f"r{g}"),
                              draw(st.integers(1, 3)), all_mode, admin, first_available,
                              cand=cand, err=err, cmask=draw(st.integers(0, (1 << n_cons) - 1)))
                if all_mode:
                    entry.all_list = [d for d in range(n) if cand >> d & 1]
                    entry.all_soft = [draw(st.integers(0, 5)) == 0 for _ in entry.all_list]
                    entry.count = len(entry.all_list)
                    entry.err = 0
                entry.cons = {d: [(dims[d][0], draw(st.integers(0, 3)))]
                              for d in range(n) if multi[d]}
                ids.append(len(entries))
                entries.append(entry)
            groups.append(ids)
        claims.append(groups)
        plans = []
        for _ in range(n_cons):
            n_values = draw(st.integers(1, 3))
            values = [-1 if draw(st.integers(0, 7)) == 0 else draw(st.integers(0, n_values - 1))
                      for _ in range(n)]
            plans.append(ConstraintPlan(
                draw(st.sampled_from([MATCH, DISTINCT])), "d/a", values,
                [sum(1 << d for d in range(n) if values[d] == v) for v in range(n_values)]))
        constraints.append(plans)
    n_sets = draw(st.integers(0, 2))
    slice_set = [draw(st.integers(-1, n_sets - 1)) for _ in range(n)]
    slice_mask = [draw(st.integers(1, 15)) if slice_set[d] >= 0 else 0 for d in range(n)]
    return Problem(
        devices=devices, base_inuse=draw(bitset) if draw(st.booleans()) else 0, multi=multi,
        base_shared=[m and draw(st.booleans()) for m in multi], counted=counted,
        blocked=[c and draw(st.integers(0, 7)) == 0 for c in counted],
        dev_counters=dev_counters, counter_avail=counter_avail,
        counter_names=[f"k{k}" for k in range(n_counters)],
        dim_avail=dim_avail, entries=entries, claims=claims, constraints=constraints,
        island=[draw(st.integers(-1, 2)) for _ in range(n)],
        bandwidth=[draw(st.sampled_from([0, 300, 900])) for _ in range(n)],
        numa=[draw(st.integers(-1, 1)) for _ in range(n)],
        pcie=[draw(st.integers(-1, 2)) for _ in range(n)],
        slice_set=slice_set, slice_mask=slice_mask,
        set_free=[draw(st.integers(0, 15)) for _ in range(n_sets)], set_full=[15] * n_sets,
        set_island=[draw(st.integers(-1, 2)) for _ in range(n_sets)],
        island_free=[draw(st.integers(0, 4)) for _ in range(3)],
        has_errors=any(e.err for e in entries))


def _same(a: allocator_ref.Found, b: allocator_ref.Found) -> None:
    assert a.status == b.status
    if a.status == "ok":
        assert a.picks == b.picks
        assert a.alts == b.alts
    if a.status == "error":
        assert (a.error_entry, a.error_device, a.error_kind) == \
               (b.error_entry, b.error_device, b.error_kind)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_parity_search_matches_the_reference(p: Problem) -> None:
    reference = allocator_ref.solve(p, BUDGET)
    if reference.status == "gave-up":
        return
    _same(reference, allocator_kernel.solve(p, BUDGET))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_topology_search_matches_the_reference(p: Problem) -> None:
    reference = allocator_ref.optimize(p, BUDGET)
    if not reference.complete:
        return
    kernel = allocator_kernel.optimize(p, BUDGET)
    _same(reference, kernel)
    if reference.status == "ok":
        assert allocator_ref.score(p, kernel.picks, kernel.alts) == \
               allocator_ref.score(p, reference.picks, reference.alts)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_pack_hands_the_kernel_typed_objects(p: Problem) -> None:
    packed = allocator_kernel.pack(p)
    devices, claims = packed.devices, packed.claims
    assert isinstance(devices, driver._alloc.DeviceArrays)
    assert isinstance(claims, driver._alloc.ClaimArrays)
    assert isinstance(packed.ledger, driver._alloc.Dynamic)
    assert (devices.n_devices, devices.words) == (p.n, 1)
    assert (claims.n_devices, claims.n_entries, claims.n_claims, claims.n_groups,
            claims.n_constraints) == (p.n, len(p.entries), len(p.claims),
                                      sum(map(len, p.claims)), sum(map(len, p.constraints)))
    assert packed.ledger.n_counters == max(1, len(p.counter_avail))
    bound = driver._alloc.Prepared(devices, claims)
    assert bound.devices is devices and bound.claims is claims
    assert bound.run(packed.ledger, 1, BUDGET) == \
        driver._alloc.run(devices, claims, packed.ledger, 1, BUDGET)


def _device_arrays(**changed: Any) -> Any:
    """Two devices without counters or topology, with `changed` fields."""
    fields: dict[str, Any] = {
        "n_devices": 2, "multi": array("b", [0, 0]), "counted": array("b", [0, 0]),
        "dc_start": array("i", [0, 0, 0]), "dc_idx": array("i", [0]),
        "dc_amt": array("q", [0]), "island": array("i", [-1, -1]),
        "bandwidth": array("i", [0, 0]), "numa": array("i", [-1, -1]),
        "pcie": array("i", [-1, -1]), "slice_set": array("i", [-1, -1]),
        "slice_mask": array("I", [0, 0]), "set_full": array("I", [0]),
        "set_island": array("i", [-1]), "set_dev_start": array("i", [0, 0]),
        "set_dev": array("i", [0])}
    return driver._alloc.DeviceArrays(**{**fields, **changed})


def test_the_kernel_checks_each_arrays_type_and_length() -> None:
    with pytest.raises(TypeError, match="made by pack_claims"):
        driver._alloc.ClaimArrays()
    assert (_device_arrays().n_devices, _device_arrays().words) == (2, 1)
    assert _device_arrays(n_devices=65, **{
        name: array(code, [0] * 65) for name, code in (
            ("multi", "b"), ("counted", "b"), ("island", "i"), ("bandwidth", "i"),
            ("numa", "i"), ("pcie", "i"), ("slice_set", "i"), ("slice_mask", "I"))},
        dc_start=array("i", [0] * 66)).words == 2
    with pytest.raises(ValueError, match="dtype mismatch"):
        _device_arrays(multi=array("i", [0, 0]))
    with pytest.raises(ValueError, match="bandwidth: 1 elements, the kernel reads 2"):
        _device_arrays(bandwidth=array("i", [0]))
    with pytest.raises(ValueError, match="dc_amt: 1 elements, the kernel reads 3"):
        _device_arrays(dc_start=array("i", [0, 1, 3]), dc_idx=array("i", [0, 0, 0]))
    with pytest.raises(ValueError, match="set_dev_start: 1 elements, the kernel reads 2"):
        _device_arrays(set_dev_start=array("i", [0]))
    with pytest.raises(ValueError, match="set_dev: 1 elements, the kernel reads 2"):
        _device_arrays(set_dev_start=array("i", [0, 2]))
    with pytest.raises(ValueError, match="multi: 0 elements"):
        _device_arrays(multi=None)
    with pytest.raises(TypeError):
        driver._alloc.DeviceArrays(2)  # keyword arguments only
    with pytest.raises(ValueError, match="base_inuse"):
        driver._alloc.dynamic(
            n_devices=2, base_inuse=array("Q"), base_shared=array("b", [0, 0]),
            blocked=array("b", [0, 0]), counter_avail=array("q", [0]),
            dim_avail=array("q", [0]), set_free=array("I", [0]), island_free=array("i", [0]))


def _widened(p: Problem, pad: int) -> Problem:
    """`p` behind `pad` devices no request can take (outside every bitset, without
    topology, counters or constraint values): its bitsets span several 64-bit words."""
    def shifted(entry: Entry) -> Entry:
        return replace(entry, cand=entry.cand << pad, err=entry.err << pad,
                       errors={d + pad: t for d, t in entry.errors.items()},
                       all_list=[d + pad for d in entry.all_list],
                       cons={d + pad: uses for d, uses in entry.cons.items()})
    none, off = [False] * pad, [-1] * pad
    return replace(
        p, devices=[Device(DeviceRef("d", "p", f"pad{i}"), {}, {}, {}, (), False, False, True)
                    for i in range(pad)] + p.devices,
        base_inuse=p.base_inuse << pad, multi=none + p.multi,
        base_shared=none + p.base_shared, counted=none + p.counted, blocked=none + p.blocked,
        dev_counters=[[] for _ in range(pad)] + p.dev_counters,
        entries=[shifted(e) for e in p.entries],
        constraints=[[replace(k, values=off + k.values, groups=[g << pad for g in k.groups])
                      for k in plans] for plans in p.constraints],
        island=off + p.island, bandwidth=[0] * pad + p.bandwidth, numa=off + p.numa,
        pcie=off + p.pcie, slice_set=off + p.slice_set, slice_mask=[0] * pad + p.slice_mask)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([60, 64, 120, 128]))
def test_claims_spanning_several_words_pack_as_one(p: Problem, pad: int) -> None:
    """Candidates, selector errors and constraint groups beyond the first 64 devices
    reach the kernel (`_alloc.pack_claims` splits each bitset into words)."""
    wide = _widened(p, pad)
    reference = allocator_ref.solve(wide, BUDGET)
    if reference.status == "gave-up":
        return
    found = allocator_kernel.solve(wide, BUDGET)
    _same(reference, found)
    if found.status == "ok":
        assert all(d >= pad for picks in found.picks for _, d in picks)


def test_an_amount_past_the_kernels_range_goes_to_the_reference() -> None:
    """A capacity amount the kernel's int64 sums could overflow: `pack_claims` refuses
    it and `solve` answers through the reference."""
    device = Device(DeviceRef("d", "p", "x"), {}, {}, {}, (), True, False, True)
    entry = Entry(0, 0, 0, _request("r"), 1, False, False, False, cand=1,
                  cons={0: [(0, 1 << 62)]})
    p = Problem(
        devices=[device], base_inuse=0, multi=[True], base_shared=[False], counted=[False],
        blocked=[False], dev_counters=[[]], counter_avail=[], counter_names=[],
        dim_avail=[1 << 61], entries=[entry], claims=[[[0]]], constraints=[[]], island=[-1],
        bandwidth=[0], numa=[-1], pcie=[-1], slice_set=[-1], slice_mask=[0], set_free=[],
        set_full=[], set_island=[], island_free=[])
    with pytest.raises(allocator_kernel.KernelRange, match="kernel's range"):
        allocator_kernel.pack(p)
    assert allocator_kernel.solve(p, BUDGET).status == allocator_ref.solve(p, BUDGET).status \
        == "fail"


def test_claims_and_ledger_must_be_of_the_node() -> None:
    p = Problem(
        devices=[], base_inuse=0, multi=[], base_shared=[], counted=[], blocked=[],
        dev_counters=[], counter_avail=[], counter_names=[], dim_avail=[], entries=[],
        claims=[], constraints=[], island=[], bandwidth=[], numa=[], pcie=[], slice_set=[],
        slice_mask=[], set_free=[], set_full=[], set_island=[], island_free=[])
    packed = allocator_kernel.pack(p)
    assert driver._alloc.run(packed.devices, packed.claims, packed.ledger, 0, BUDGET)[0] == 1
    with pytest.raises(ValueError, match="claims packed for 0 devices, the node has 2"):
        driver._alloc.Prepared(_device_arrays(), packed.claims)
    bound = driver._alloc.Prepared(packed.devices, packed.claims)
    with pytest.raises(ValueError, match="ledger state for 2 devices, problem of 0"):
        bound.run(driver._alloc.Dynamic(2, 0, 0, 0, 0), 0, BUDGET)


def _sequence_ledgers(allocator: Allocator, claims: list[Claim], start: Ledger, node: Node
                      ) -> list[Ledger]:
    """The instance's ledger, an empty one, one without its first claim, and the
    ledgers after each claim is allocated on top of the instance's, one at a time."""
    ledgers = [start, Ledger()]
    if start.claims():
        lighter = start.copy()
        lighter.remove(start.claims()[0])
        ledgers.append(lighter)
    growing = start.copy()
    for claim in claims:
        outcome = allocator.allocate([claim], growing, node, backend="reference",
                                     budget=20_000)
        if outcome.status != "allocated":
            break
        growing.add(claim.key, outcome.allocations[0]["devices"]["results"])
        ledgers.append(growing.copy())
    return ledgers


def test_a_warm_allocator_answers_as_the_reference_under_every_ledger() -> None:
    """The kernel path keeps the node's tables, each claim list's compiled problem and
    computes the ledger's part in C; the reference builds everything afresh. One
    allocator serves every ledger, so stale state would show as a different answer."""
    compared = fast_nodes = 0
    statuses: set[str] = set()
    for i in range(150):
        problem = instance(random.Random(f"warm-{i}"))
        try:
            allocator = Allocator(problem["slices"], problem["classes"],
                                  problem["taintRules"])
            claims = allocator.parse(problem["claims"])
        except InputError:
            continue
        raw = problem["node"]
        node = Node(raw["name"], tuple(sorted(raw["labels"].items())))
        for ledger in _sequence_ledgers(allocator, claims, Ledger.of(problem["allocated"]),
                                        node):
            for mode in ("parity", "topology"):
                reference = allocator.allocate(claims, ledger, node, mode, "reference",
                                               budget=20_000)
                if reference.status == "gave-up" or not reference.complete:
                    continue
                native = allocator.allocate(claims, ledger, node, mode, "native",
                                            budget=20_000)
                assert normalized(asdict(native)) == normalized(asdict(reference)), \
                    f"instance warm-{i}, {mode}"
                assert native.message == reference.message
                statuses.add(native.status)
                compared += 1
        fast_nodes += allocator._sites[node].model.kernel not in (None, False)
    assert compared > 300
    assert fast_nodes > 50
    assert statuses == {"allocated", "unschedulable", "error"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 3),
                          st.lists(st.tuples(st.sampled_from(["p1", "p2"]), st.integers(0, 3),
                                             st.booleans()), max_size=3)), max_size=12))
def test_the_ledger_indexes_held_devices_by_pool(ops: list[Any]) -> None:
    """Also: a device stays held while any claim holds it, even one that two claims hold
    whole (inconsistent input, as a damaged checkpoint gives)."""
    ledger = Ledger()
    holding: dict[int, set[tuple[str, str]]] = {}
    for op, owner, picks in ops:
        if op == "remove":
            ledger.remove(f"ns/c{owner}")
            holding.pop(owner, None)
            continue
        ledger.add(f"ns/c{owner}", [{"driver": "d", "pool": pool, "device": f"x{d}",
                                     **({"shareID": "s"} if shared else {})}
                                    for pool, d, shared in picks])
        holding[owner] = {(pool, f"x{d}") for pool, d, _ in picks}
    for pool in ("p1", "p2"):
        held = {ref for ref in [*ledger.exclusive, *ledger.shares] if ref.pool == pool}
        assert ledger.held_in("d", pool) == held
        assert {ref.device for ref in held} == {
            device for devices in holding.values() for p, device in devices if p == pool}


def test_claims_with_a_uid_and_resource_version_are_parsed_once() -> None:
    allocator = Allocator([], driver_classes("gpu.dra.dev"))
    raw = {"metadata": {"name": "a", "namespace": "ns", "uid": "u1", "resourceVersion": "7"},
           "spec": {"devices": {"requests": [{"name": "r", "exactly": {
               "deviceClassName": "gpu.dra.dev"}}]}}}
    first, = allocator.parse([raw])
    assert allocator.parse([raw])[0] is first
    changed = {**raw, "metadata": {**raw["metadata"], "resourceVersion": "8"},
               "spec": {"devices": {"requests": [{"name": "r", "exactly": {
                   "deviceClassName": "gpu.dra.dev", "count": 2}}]}}}
    second, = allocator.parse([changed])
    assert second.requests[0].alternatives[0].count == 2
    anonymous = {**raw, "metadata": {"name": "a", "namespace": "ns"}}
    assert allocator.parse([anonymous])[0] is not allocator.parse([anonymous])[0]
