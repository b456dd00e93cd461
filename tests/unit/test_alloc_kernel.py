"""The native kernel gives the pure-Python reference's answers on any problem.

Problems are drawn at the level the searches see (bitsets, counters, constraints,
firstAvailable, All, admin access, shared devices, selector errors), small enough
for the unpruned reference to finish.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import driver._alloc
from driver.allocator import kernel as allocator_kernel
from driver.allocator import reference as allocator_ref
from driver.allocator.input import Request
from driver.allocator.ledger import DeviceRef
from driver.allocator.model import DISTINCT, MATCH, ConstraintPlan, Entry, Problem
from driver.allocator.pools import Device

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
