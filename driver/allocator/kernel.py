"""A `Problem` packed into flat arrays for the native kernel (`driver._alloc`).

The kernel takes typed objects with one named field per array (native/_alloc.pyx; the
sizes are named in native/_alloc_types.pxd): `_alloc.DeviceArrays` (the node's
devices, packed once per NodeModel, kept in a `NodeArrays`), `_alloc.ClaimArrays` (the
claims) and `_alloc.Dynamic` (the ledger's part); `pack` makes all three (`Packed`).

Same interface as `reference` (`solve`, `optimize` -> `Found`). Importing this
module fails where the extension is not built; driver.allocator then uses the
reference. Counters and capacities beyond what int64 holds with headroom go to the
reference too (`KernelRange`), which computes with Python integers.

`NodeKernel` is the path `Allocator` takes: the node's arrays packed once per version
of its slices, a claim list's arrays packed and bound (`_alloc.Prepared`) once per
Allocator, and per call only the ledger's part, computed in C (`_alloc.Tables.state`).
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from driver import _alloc
from driver.allocator.input import Claim, DeviceClass
from driver.allocator.ledger import Ledger
from driver.allocator.model import (
    AllocationError,
    ConstraintPlan,
    Entry,
    Evaluations,
    NodeModel,
    Problem,
)
from driver.allocator.reference import Found
from driver.allocator.reference import optimize as ref_optimize
from driver.allocator.reference import solve as ref_solve
from driver.errors import AllocatorError

if TYPE_CHECKING:  # the search's answer, as native/_alloc.pyx builds it
    from driver._alloc import _RunResult

_MASK = (1 << 64) - 1
_STATUS = {1: "ok", 0: "fail", -2: "error", -3: "gave-up"}


class KernelRange(AllocatorError, ValueError):
    """Amounts too large for the kernel's 64-bit arithmetic."""


def solve(p: Problem, budget: int) -> Found:
    try:
        packed = pack(p)
    except KernelRange:
        return ref_solve(p, budget)
    return _found(_alloc.run(packed.devices, packed.claims, packed.ledger, 0, budget), p)


def optimize(p: Problem, budget: int) -> Found:
    try:
        packed = pack(p)
    except KernelRange:
        return ref_optimize(p, budget)
    return _found(_alloc.run(packed.devices, packed.claims, packed.ledger, 1, budget), p)


def _found(raw: _RunResult, p: Problem) -> Found:
    status, picks, alts, (err_e, err_d, err_kind), nodes, has_best = raw
    if status == -1:
        return Found("error", error_kind="max-size", nodes=nodes)
    if status == 1:
        i = 0
        split = []
        for groups in p.claims:
            split.append(alts[i:i + len(groups)])
            i += len(groups)
        return Found("ok", picks, split, nodes=nodes)
    found = Found(_STATUS[status], nodes=nodes)
    if status == -2:
        found.error_entry, found.error_device = err_e, err_d
        found.error_kind = "selector" if err_kind == 1 else "constraint"
    if status == -3:
        found.complete = False
        if has_best:
            found.status = "ok"
    return found


def _words(bits: int, w: int) -> list[int]:
    return [(bits >> (64 * i)) & _MASK for i in range(w)]


def _check(values: list[int]) -> list[int]:
    limit = _alloc.AMOUNT_LIMIT  # the bound pack_claims holds the claims' amounts to
    if values and (min(values) <= -limit or max(values) >= limit):
        raise KernelRange("amount out of the kernel's range")
    return values


def _i8(values: list[Any]) -> array[int]:
    return array("b", [1 if v else 0 for v in values] or [0])


def _i32(values: list[int]) -> array[int]:
    return array("i", values or [0])


def _i64(values: list[int]) -> array[int]:
    return array("q", values or [0])


def _u32(values: list[int]) -> array[int]:
    return array("I", values or [0])


def _u64(values: list[int]) -> array[int]:
    return array("Q", values or [0])


@dataclass(frozen=True, slots=True)
class NodeArrays:
    """What only depends on the node's devices, packed once per NodeModel: the kernel's
    `DeviceArrays`, and what packing the claims and the ledger's flags reads."""

    devices: _alloc.DeviceArrays
    multi_bits: int  # devices that allow multiple allocations, as a bitset
    nothing: array[int]  # n_devices zeros: the node model's all-false flags, packed

    @property
    def words(self) -> int:
        """64-bit words of a device bitset."""
        return self.devices.words


@dataclass(frozen=True, slots=True)
class Packed:
    """A whole `Problem` as the kernel takes it (`_alloc.run`)."""

    devices: _alloc.DeviceArrays
    claims: _alloc.ClaimArrays
    ledger: _alloc.Dynamic


def _static(p: Problem) -> NodeArrays:
    """Arrays that only depend on the node's devices: built once per NodeModel."""
    cached = p.static.packed if p.static is not None else None
    if cached is not None:
        return cached
    dc_start, dc_idx, dc_amt = [0], [], []
    for uses in p.dev_counters:
        for k, amount in uses:
            dc_idx.append(k)
            dc_amt.append(amount)
        dc_start.append(len(dc_idx))
    totals = [0] * len(p.counter_names)
    for k, amount in zip(dc_idx, dc_amt, strict=True):
        totals[k] += abs(amount)
    _check(totals)
    of_set: list[list[int]] = [[] for _ in range(max(1, len(p.set_full)))]
    for d in range(p.n):
        if p.slice_set[d] >= 0:
            of_set[p.slice_set[d]].append(d)
    set_dev_start, set_dev = [0], []  # each slice set's devices (its MIG placements)
    for devices in of_set:
        set_dev += devices
        set_dev_start.append(len(set_dev))
    packed = NodeArrays(
        _alloc.DeviceArrays(
            n_devices=p.n, multi=_i8(p.multi), counted=_i8(p.counted),
            dc_start=_i32(dc_start), dc_idx=_i32(dc_idx), dc_amt=_i64(dc_amt),
            island=_i32(p.island), bandwidth=_i32(p.bandwidth), numa=_i32(p.numa),
            pcie=_i32(p.pcie), slice_set=_i32(p.slice_set), slice_mask=_u32(p.slice_mask),
            set_full=_u32(p.set_full), set_island=_i32(p.set_island),
            set_dev_start=_i32(set_dev_start), set_dev=_i32(set_dev)),
        multi_bits=sum(1 << d for d in range(p.n) if p.multi[d]),
        nothing=_i8(p.static.no_blocks if p.static is not None else []))
    if p.static is not None:
        p.static.packed = packed
    return packed


def _flags(p: Problem, flags: list[bool], static: NodeArrays) -> array[int]:
    """The node model's all-false list is packed once."""
    if p.static is not None and flags is p.static.no_blocks:
        return static.nothing
    return _i8(flags)


def pack(p: Problem) -> Packed:
    static = _static(p)
    _check(p.counter_avail)
    _check(p.dim_avail)
    ledger = _alloc.dynamic(
        n_devices=p.n, base_inuse=_u64(_words(p.base_inuse, static.words)),
        base_shared=_flags(p, p.base_shared, static), blocked=_flags(p, p.blocked, static),
        counter_avail=_i64(p.counter_avail), dim_avail=_i64(p.dim_avail),
        set_free=_u32(p.set_free), island_free=_i32(p.island_free))
    return Packed(static.devices, _claim_arrays(p.entries, p.claims, p.constraints, static),
                  ledger)


def _claim_arrays(entries: list[Entry], claims: list[list[list[int]]],
                  constraints: list[list[ConstraintPlan]], static: NodeArrays
                  ) -> _alloc.ClaimArrays:
    """The arrays that depend on the claims (requests, candidates, constraints), packed
    in C (`_alloc.pack_claims`): per cold call, once."""
    try:
        return _alloc.pack_claims(entries, claims, constraints, static.devices.n_devices,
                                  static.multi_bits)
    except OverflowError as err:
        raise KernelRange(str(err)) from err


@dataclass
class Plan:
    """Claims compiled for one node: the problem without the ledger's part (its
    entries, request groups and constraints say what the picks mean) and the kernel's
    arrays of it, bound once; or the error the scheduler reports for these claims."""

    claims: tuple[Claim, ...]  # keeps the objects whose ids key the cache alive
    problem: Problem | None = None
    prepared: _alloc.Prepared | None = None
    error: AllocationError | None = None

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and this one is made on every decision.
    def __init__(self, claims: tuple[Claim, ...], problem: Problem | None = None,
                 prepared: _alloc.Prepared | None = None,
                 error: AllocationError | None = None) -> None:
        self.claims, self.problem, self.prepared, self.error = claims, problem, prepared, error


class NodeKernel:
    """One node's packed arrays and counter tables: static, kept with its `NodeModel`
    (so built once per version of the node's slices).

    Per call only what the ledger decides is computed (in C, from the devices the
    node's pools have allocated), and `plan` compiles a list of claims against it
    (the caller keeps the plans of one Allocator). For nodes without devices that allow
    multiple allocations; `node_kernel` says None for the others.
    """

    def __init__(self, model: NodeModel) -> None:
        self.model = model
        # The problem of no claims and an empty ledger: a plan's, but for its claims'
        # part (the kernel takes the ledger's part from `state`).
        self.empty = model.problem([], {}, Ledger(), Evaluations())
        self.static = _static(self.empty)
        held = [*model.devices, *(d for p in model.usable for d in p.elsewhere)]
        self.index = {d.ref: i for i, d in enumerate(held)}
        self.pools = [(p.driver, p.name) for p in model.usable]
        counters, topology = model.counters, model.topology
        pool_ids = {str(p): i for i, p in enumerate(model.usable)}
        counter_pool = [0] * len(counters.names)
        for pool, ks in counters.pool_counters.items():
            for k in ks:
                counter_pool[k] = pool_ids[pool]
        _check(counters.declared)
        self.tables = _alloc.Tables(
            len(model.devices), [counters.uses[d.ref] for d in held], counters.declared,
            counter_pool, [pool_ids[counters.pool_of[d.ref]] for d in model.devices],
            model.counted, topology.set_slots, topology.set_full, topology.slice_set,
            topology.island_members)

    def plan(self, claims: Sequence[Claim], classes: Mapping[str, DeviceClass],
             evaluations: Evaluations) -> Plan:
        found = Plan(tuple(claims))
        try:
            entries, groups, constraints = self.model.compile(claims, classes, evaluations)
        except AllocationError as err:
            found.error = err
        else:
            # No device allows multiple allocations (`node_kernel`): no capacity to scale.
            problem = found.problem = self.empty.with_claims(entries, groups, constraints)
            found.prepared = _alloc.Prepared(self.static.devices, _claim_arrays(
                problem.entries, problem.claims, problem.constraints, self.static))
        return found

    def state(self, ledger: Ledger) -> _alloc.Dynamic | None:
        """The ledger's part for this node (`_alloc.Dynamic`); None where counters
        leave the kernel's range."""
        exclusive, shares, index = ledger.exclusive, ledger.shares, self.index
        whole: list[int] = []
        shared: list[int] = []
        for driver, pool in self.pools:
            for ref in ledger.held_in(driver, pool):
                i = index.get(ref)
                if i is not None:
                    if ref in exclusive:
                        whole.append(i)
                    if ref in shares:
                        shared.append(i)
        return self.tables.state(whole, shared)

    def search(self, plan: Plan, state: _alloc.Dynamic, optimize: bool, budget: int) -> Found:
        assert plan.problem is not None and plan.prepared is not None
        return _found(plan.prepared.run(state, 1 if optimize else 0, budget), plan.problem)


def node_kernel(model: NodeModel) -> NodeKernel | None:
    """The node's kernel, made once per model; None where the general path (`solve`)
    must serve it."""
    if model.kernel is False:
        model.kernel = None
        if not model.multi_devices:
            with suppress(KernelRange):
                model.kernel = NodeKernel(model)
    found: NodeKernel | None = model.kernel
    return found
