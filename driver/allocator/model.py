"""Claims + pools + ledger -> a `Problem`: bitsets and integer tables the search runs on.

Everything that does not change while searching is decided here, once: which devices
each request (or subrequest) may take (class and request selectors, node, capacity
policy, taints), which selector errors the search would run into, the attribute
value of every device under every constraint, counters and shared capacity scaled to
exact integers. The searches (`reference`, the native kernel) see only this.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from math import lcm
from typing import TYPE_CHECKING, Any

from driver.allocator.cel import Read, Selector, SelectorError, decide
from driver.allocator.input import MAX_RESULTS, Claim, DeviceClass, Request
from driver.allocator.ledger import DeviceRef, Ledger
from driver.allocator.pools import MAX_DEVICES, Device, Pool, Verdicts, held_devices
from driver.allocator.versions import Recent
from driver.errors import AllocatorError
from driver.kube.quantity import parse_quantity

if TYPE_CHECKING:  # kernel imports this module, and needs the built extension
    from driver.allocator.kernel import NodeArrays

MATCH, DISTINCT = 0, 1


class AllocationError(AllocatorError):
    """What the scheduler reports as an error instead of "does not fit"."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Entry:
    """One request, or one subrequest of a firstAvailable request."""

    claim: int
    group: int
    alt: int
    request: Request
    count: int
    all_mode: bool
    admin: bool
    first_available: bool
    cand: int = 0
    err: int = 0
    errors: dict[int, str] = field(default_factory=dict)
    all_list: list[int] = field(default_factory=list)
    all_soft: list[bool] = field(default_factory=list)
    cmask: int = 0
    cons: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    consumed: dict[int, dict[str, Fraction]] = field(default_factory=dict)

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and this one is made on every decision.
    def __init__(self, claim: int, group: int, alt: int, request: Request, count: int,
                 all_mode: bool, admin: bool, first_available: bool, cand: int = 0,
                 err: int = 0, errors: dict[int, str] | None = None,
                 all_list: list[int] | None = None, all_soft: list[bool] | None = None,
                 cmask: int = 0, cons: dict[int, list[tuple[int, int]]] | None = None,
                 consumed: dict[int, dict[str, Fraction]] | None = None) -> None:
        self.claim, self.group, self.alt, self.request = claim, group, alt, request
        self.count, self.all_mode, self.admin = count, all_mode, admin
        self.first_available, self.cand, self.err = first_available, cand, err
        self.errors = {} if errors is None else errors
        self.all_list = [] if all_list is None else all_list
        self.all_soft = [] if all_soft is None else all_soft
        self.cmask = cmask
        self.cons = {} if cons is None else cons
        self.consumed = {} if consumed is None else consumed


@dataclass
class ConstraintPlan:
    kind: int
    attribute: str
    values: list[int]  # value id per device; -1: the device lacks the attribute
    groups: list[int]  # value id -> bitset of devices with that value


@dataclass
class Problem:
    devices: list[Device]
    base_inuse: int
    multi: list[bool]
    base_shared: list[bool]
    counted: list[bool]
    blocked: list[bool]
    dev_counters: list[list[tuple[int, int]]]
    counter_avail: list[int]
    counter_names: list[str]
    dim_avail: list[int]
    entries: list[Entry]
    claims: list[list[list[int]]]  # claim -> request -> entry indexes
    constraints: list[list[ConstraintPlan]]
    # Topology features (scores only; never change feasibility).
    island: list[int]
    bandwidth: list[int]
    numa: list[int]
    pcie: list[int]
    slice_set: list[int]
    slice_mask: list[int]
    set_free: list[int]
    set_full: list[int]
    set_island: list[int]
    island_free: list[int]
    has_errors: bool = False
    static: NodeModel | None = None  # the model it came from (the kernel caches arrays on it)

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and this one is made on every decision.
    def __init__(self, devices: list[Device], base_inuse: int, multi: list[bool],
                 base_shared: list[bool], counted: list[bool], blocked: list[bool],
                 dev_counters: list[list[tuple[int, int]]], counter_avail: list[int],
                 counter_names: list[str], dim_avail: list[int], entries: list[Entry],
                 claims: list[list[list[int]]], constraints: list[list[ConstraintPlan]],
                 island: list[int], bandwidth: list[int], numa: list[int], pcie: list[int],
                 slice_set: list[int], slice_mask: list[int], set_free: list[int],
                 set_full: list[int], set_island: list[int], island_free: list[int],
                 has_errors: bool = False, static: NodeModel | None = None) -> None:
        self.devices = devices
        self.base_inuse = base_inuse
        self.multi = multi
        self.base_shared = base_shared
        self.counted = counted
        self.blocked = blocked
        self.dev_counters = dev_counters
        self.counter_avail = counter_avail
        self.counter_names = counter_names
        self.dim_avail = dim_avail
        self.entries = entries
        self.claims = claims
        self.constraints = constraints
        self.island = island
        self.bandwidth = bandwidth
        self.numa = numa
        self.pcie = pcie
        self.slice_set = slice_set
        self.slice_mask = slice_mask
        self.set_free = set_free
        self.set_full = set_full
        self.set_island = set_island
        self.island_free = island_free
        self.has_errors = has_errors
        self.static = static

    @property
    def n(self) -> int:
        return len(self.devices)

    def with_claims(self, entries: list[Entry], claims: list[list[list[int]]],
                    constraints: list[list[ConstraintPlan]]) -> Problem:
        """This problem (of no claims) with the claims' part in place of its own."""
        return Problem(self.devices, self.base_inuse, self.multi, self.base_shared,
                       self.counted, self.blocked, self.dev_counters, self.counter_avail,
                       self.counter_names, self.dim_avail, entries, claims, constraints,
                       self.island, self.bandwidth, self.numa, self.pcie, self.slice_set,
                       self.slice_mask, self.set_free, self.set_full, self.set_island,
                       self.island_free, any(e.err for e in entries), self.static)


class NodeModel:
    """What one node's pools offer before any claim: devices in search order, counters
    scaled to integers, topology features, constraint values per attribute, devices
    grouped by the values a selector reads, the kernel's tables (`kernel`).

    Built once per version of its pools (`node_model`) and shared by Allocators: it
    holds nothing that depends on classes, claims or the ledger. `problem()` adds
    those, with the selector results of one Allocator (`Evaluations`).
    """

    def __init__(self, pools: Sequence[Pool]) -> None:
        self.pools = list(pools)
        self.usable = [p for p in pools if p.usable]
        self.devices = [d for p in self.usable for d in p.devices]
        self.index = {d.ref: i for i, d in enumerate(self.devices)}
        self.multi = [d.multi for d in self.devices]
        self.counted = [d.counted for d in self.devices]
        self.counters = _counters(self.usable)
        self.dev_counters = [self.counters.uses[d.ref] for d in self.devices]
        self.topology = _topology(self.devices, self.counters)
        self.no_blocks = [False] * len(self.devices)  # also "no shares": read-only
        self.multi_devices = [i for i, m in enumerate(self.multi) if m]
        self.multi_bits = _bits_where(self.multi)
        self.all_bits = (1 << len(self.devices)) - 1
        self.node_ok_bits = _bits_where(d.node_ok for d in self.devices)
        # Capacity taken whole by a request asking for none (`consumed_capacity`).
        self.plain_bits = _bits_where(d.plain_capacity for d in self.devices)
        self.tainted_bits = _bits_where(any(t.blocks for t in d.taints) for d in self.devices)
        self._groups: dict[tuple[Read, ...] | None, list[tuple[Any, int]]] = {}
        self._constraints: dict[tuple[str, str], ConstraintPlan] = {}
        self.packed: NodeArrays | None = None  # the kernel's arrays of the above
        # What a device puts in every result that picks it (`allocate._Part`), by index,
        # made when first picked.
        self.parts: dict[int, Any] = {}
        self.kernel: Any = False  # kernel.NodeKernel; None: the general path; False: not yet

    def problem(self, claims: Sequence[Claim], classes: Mapping[str, DeviceClass],
                ledger: Ledger, evaluations: Evaluations) -> Problem:
        """The pre-pass of Allocate: AllocationError where the scheduler errors out."""
        devices = self.devices
        base_inuse = 0
        for ref in ledger.exclusive:
            i = self.index.get(ref)
            if i is not None:
                base_inuse |= 1 << i
        base_shared = self.no_blocks
        for ref in (*ledger.shares, *ledger.capacity):
            i = self.index.get(ref)
            if i is not None:
                if base_shared is self.no_blocks:
                    base_shared = list(self.no_blocks)
                base_shared[i] = True
        avail, negative = self.counters.available(ledger)
        blocked = self.no_blocks if not negative else [
            d.counted and f"{d.ref.driver}/{d.ref.pool}" in negative for d in devices]
        dims = _dims(devices, self.multi_devices, ledger)
        entries, claim_plans, constraint_plans = self.compile(claims, classes, evaluations)
        topology = self.topology
        set_free = topology.free_sets(avail)
        problem = Problem(
            devices=devices, base_inuse=base_inuse, multi=self.multi, base_shared=base_shared,
            counted=self.counted, blocked=blocked, dev_counters=self.dev_counters,
            counter_avail=avail, counter_names=self.counters.names,
            dim_avail=[], entries=entries, claims=claim_plans, constraints=constraint_plans,
            island=topology.island, bandwidth=topology.bandwidth, numa=topology.numa,
            pcie=topology.pcie, slice_set=topology.slice_set, slice_mask=topology.slice_mask,
            set_free=set_free, set_full=topology.set_full, set_island=topology.set_island,
            island_free=topology.free_islands(base_inuse, set_free),
            has_errors=any(e.err for e in entries), static=self)
        _scale_dims(problem, dims)
        return problem

    def compile(self, claims: Sequence[Claim], classes: Mapping[str, DeviceClass],
                evaluations: Evaluations
                ) -> tuple[list[Entry], list[list[list[int]]], list[list[ConstraintPlan]]]:
        """The part of the problem that depends on the claims alone: entries (one per
        request or subrequest, with its candidates), request groups per claim, the
        constraint plans per claim. AllocationError where the scheduler errors out
        whatever is allocated."""
        entries: list[Entry] = []
        claim_plans: list[list[list[int]]] = []
        constraint_plans: list[list[ConstraintPlan]] = []
        for c, claim in enumerate(claims):
            groups: list[list[int]] = []
            min_total = 0
            for g, group in enumerate(claim.requests):
                ids: list[int] = []
                for a, request in enumerate(group.alternatives):
                    found = self._classify(request, claim, classes[request.class_name],
                                           evaluations)
                    entry = Entry(
                        c, g, a, request,
                        len(found.all_list) if request.all_devices else request.count,
                        request.all_devices, request.admin_access, group.first_available,
                        found.cand, found.err,
                        {d: text.replace(CLAIM, claim.key) for d, text in found.errors.items()}
                        if found.errors else {},
                        found.all_list, found.all_soft,
                        sum(1 << k for k, con in enumerate(claim.constraints)
                            if con.applies(request)) if claim.constraints else 0,
                        {}, found.consumed)
                    ids.append(len(entries))
                    entries.append(entry)
                need = min(entries[i].count for i in ids)
                if need > MAX_RESULTS - min_total:
                    raise AllocationError(
                        f"claim {claim.key}, request {group.name}: adding {need} devices "
                        f"exceeds the claim limit of {MAX_RESULTS}, with {min_total} already "
                        "accounted for", f"{group.alternatives[0].field}.count")
                min_total += need
                groups.append(ids)
            claim_plans.append(groups)
            constraint_plans.append([self._constraint(con.kind, con.attribute)
                                     for con in claim.constraints])
        return entries, claim_plans, constraint_plans

    def _classify(self, request: Request, claim: Claim, device_class: DeviceClass,
                  evaluations: Evaluations) -> _Classified:
        """The request's classification on this node, once per Allocator; raises where
        an All request cannot be served."""
        if request.all_devices:
            for pool in self.pools:
                if pool.incomplete:
                    raise AllocationError(
                        f"claim {claim.key}, request {request.name}: asks for all devices, "
                        f"but resource pool {pool} is currently being updated",
                        f"{request.field}.allocationMode")
                if pool.invalid:
                    raise AllocationError(
                        f"claim {claim.key}, request {request.name}: asks for all devices, "
                        f"but resource pool {pool} is currently invalid ({pool.invalid})",
                        f"{request.field}.allocationMode")
        key = (id(self), request.class_name,
               tuple([s.expression for s in request.selectors]) if request.selectors else (),
               request.tolerations, request.capacity, request.all_devices)
        found = evaluations.classified.get(key)
        if found is None:
            found = evaluations.classified[key] = _classify(request, device_class, self,
                                                            evaluations.verdicts)
        if request.all_devices and found.errors:
            first = min(found.errors)
            raise AllocationError(found.errors[first].replace(CLAIM, claim.key), request.field)
        return found

    def groups(self, reads: tuple[Read, ...] | None) -> list[tuple[Any, int]]:
        """The devices as (the values `reads` takes on them, bitset of the devices that
        agree), in order of each group's first device; a device whose values cannot be
        told apart (`Device.values` None, or `reads` None) alone, with None. Derived from
        the devices alone: kept with the model."""
        found = self._groups.get(reads)
        if found is None:
            by_values: dict[Any, int] = {}
            alone: list[tuple[Any, int]] = []
            for i, device in enumerate(self.devices):
                values = device.values(reads) if reads is not None else None
                if values is None:
                    alone.append((None, 1 << i))
                else:
                    by_values[values] = by_values.get(values, 0) | 1 << i
            found = self._groups[reads] = [*by_values.items(), *alone]
        return found

    def selected(self, selectors: Sequence[Selector], verdicts: Verdicts, bits: int) -> int:
        """Of the devices in `bits`, those every selector selects (one that errors
        selects none): one verdict per group of devices that agree on what the selector
        reads (`groups`), not one per device."""
        for selector in selectors:
            passing = 0
            for values, group in self.groups(selector.reads):
                if group & bits:
                    device = self.devices[(group & -group).bit_length() - 1]
                    if _verdict(selector, values, device, verdicts) is True:
                        passing |= group
            bits &= passing
        return bits

    def devices_in(self, bits: int) -> list[Device]:
        return [self.devices[i] for i in _indexes(bits)]

    def _constraint(self, kind: str, attribute: str) -> ConstraintPlan:
        found = self._constraints.get((kind, attribute))
        if found is None:
            found = self._constraints[(kind, attribute)] = _constraint(kind, attribute,
                                                                       self.devices)
        return found


@dataclass
class Evaluations:
    """What one Allocator worked out for its classes and claims, never kept past it:
    selector results (devices that agree on what a selector reads share one, across
    the Allocator's nodes) and each request's classification per node model."""

    verdicts: Verdicts = field(default_factory=dict)
    classified: dict[tuple[Any, ...], _Classified] = field(default_factory=dict)

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and this one is made on every decision.
    def __init__(self) -> None:
        self.verdicts = {}
        self.classified = {}


# Node models per tuple of their pools' keys (`Pool.key`): the pools' static parts and
# the kernel's tables, made once per version of the node's slices and reused by the
# next Allocator, as kube-scheduler's informer decodes each slice version once.
_models: Recent[tuple[Any, ...], NodeModel] = Recent(MAX_DEVICES, lambda m: held_devices(m.pools))


def node_model(pools: Sequence[Pool]) -> NodeModel:
    """The model of a node's pools: the one made for the same pool versions, else new
    (and kept when every pool has a key)."""
    key = tuple(p.key for p in pools)
    if None in key:
        return NodeModel(pools)
    found = _models.get(key)
    if found is None:
        found = _models.put(key, NodeModel(pools))
    return found


def _bits_where(flags: Iterable[bool]) -> int:
    return sum(1 << i for i, flag in enumerate(flags) if flag)


def _indexes(bits: int) -> Iterator[int]:
    """The set bits of `bits`, lowest first."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


CLAIM = "\x00claim\x00"  # stands for the claim's name in cached error messages


@dataclass(slots=True)
class _Classified:  # read-only once made (not frozen: made per request per cold call)
    cand: int
    err: int
    errors: dict[int, str]
    all_list: list[int]
    all_soft: list[bool]
    consumed: dict[int, dict[str, Fraction]]

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and this one is made on every decision.
    def __init__(self, cand: int, err: int, errors: dict[int, str], all_list: list[int],
                 all_soft: list[bool], consumed: dict[int, dict[str, Fraction]]) -> None:
        self.cand, self.err, self.errors = cand, err, errors
        self.all_list, self.all_soft, self.consumed = all_list, all_soft, consumed


def _classify(request: Request, device_class: DeviceClass, model: NodeModel,
              verdicts: Verdicts) -> _Classified:
    """Which devices a request may take: selectors, node, capacity policy, taints.

    Each selector once per group of devices that agree on what it reads
    (`NodeModel.groups`), on the devices no earlier selector refused. For an All
    request, the fixed list (selectable and capacity-fitting, taints included:
    upstream fails the request on them later); errors in device order. `consumed`:
    for devices that allow multiple allocations and those a policy or a request's
    capacity changes; the others take their capacity whole.
    """
    devices = model.devices
    alive = model.all_bits
    err = 0
    errors: dict[int, str] = {}
    for owner, name, selectors in (("class", device_class.name, device_class.selectors),
                                   ("claim", CLAIM, request.selectors)):
        for k, selector in enumerate(selectors):
            passed = 0
            for values, bits in model.groups(selector.reads):
                bits &= alive
                if not bits:
                    continue
                result = _verdict(selector, values, devices[(bits & -bits).bit_length() - 1],
                                  verdicts)
                if result is True:
                    passed |= bits
                elif isinstance(result, str):
                    err |= bits
                    for i in _indexes(bits):
                        errors[i] = (f"{owner} {name}: selector #{k} on device "
                                     f"{devices[i].ref}: {result}")
            alive = passed
    selected = alive & model.node_ok_bits
    fits = selected & model.plain_bits if not request.capacity else 0
    consumed_by: dict[int, dict[str, Fraction]] = {
        i: devices[i].capacity for i in _indexes(fits & model.multi_bits)}
    for i in _indexes(selected & ~fits):
        device = devices[i]
        consumed = consumed_capacity(CLAIM, request, device)
        if consumed is None:
            continue
        if isinstance(consumed, str):
            err |= 1 << i
            errors[i] = consumed
            continue
        if not (consumed is device.capacity or all(
                consumed[k] <= v for k, v in device.capacity.items())) \
                and (request.all_devices or not device.multi):
            continue
        consumed_by[i] = consumed
        fits |= 1 << i
    tainted = fits & model.tainted_bits
    if tainted and request.tolerations:
        tainted = sum(1 << i for i in _indexes(tainted)
                      if devices[i].untolerated(request.tolerations))
    if errors:
        errors = dict(sorted(errors.items()))
    if request.all_devices:
        all_list = list(_indexes(fits))
        return _Classified(0, err, errors, all_list,
                           [bool(tainted >> i & 1) for i in all_list], consumed_by)
    return _Classified(fits & ~tainted, err, errors, [], [], consumed_by)


def selectable(claim_key: str, device_class: DeviceClass, request: Request,
               device: Device, verdicts: Verdicts) -> bool | str:
    """True, False, or the error the scheduler would stop with."""
    for owner, selectors in ((f"class {device_class.name}", device_class.selectors),
                             (f"claim {claim_key}", request.selectors)):
        for k, selector in enumerate(selectors):
            values = device.values(selector.reads) if selector.reads is not None else None
            result = _verdict(selector, values, device, verdicts)
            if isinstance(result, str):
                return f"{owner}: selector #{k} on device {device.ref}: {result}"
            if not result:
                return False
    return device.node_ok


def _verdict(selector: Selector, values: tuple[Any, ...] | None, device: Device,
             verdicts: Verdicts) -> bool | str:
    """The selector on the device, whose `values` are those of `selector.reads` (None:
    not told apart): True, False or the error text. Devices that agree on every field
    the selector reads share one evaluation; equality tests on plain values are decided
    without CEL (`cel.decide`)."""
    key = (selector.expression, values if values is not None else id(device))
    found = verdicts.get(key)
    if found is not None:
        return found
    if values is not None and selector.tests is not None:
        decided = decide(selector.tests, values)
        if decided is not None:
            verdicts[key] = decided
            return decided
    try:
        result: bool | str = selector.matches(
            device.cel if values is None or selector.reads is None
            else device.read_input(selector.reads))
    except SelectorError as err:
        result = str(err)
    verdicts[key] = result
    return result


def consumed_capacity(claim_key: str, request: Request, device: Device
                      ) -> dict[str, Fraction] | str | None:
    """The capacity this request would take of every capacity of the device;
    None where the request names a capacity the device lacks or breaks its policy."""
    if not request.capacity and device.plain_capacity:
        return device.capacity  # every capacity whole (read-only)
    asked = dict(request.capacity)
    if any(name not in device.capacity for name in asked):
        return None
    consumed: dict[str, Fraction] = {}
    policies = request_policies(device)
    for name, value in device.capacity.items():
        amount = policy_amount(asked.get(name), value, policies.get(name))
        if amount < 0:
            return (f"claim {claim_key}, request {request.name}: checking capacity for device "
                    f"{device.ref}: capacity {name!r}: capacity value is negative")
        if violates_policy(amount, policies.get(name)):
            return None
        consumed[name] = amount
    return consumed


def _q(text: Any) -> Fraction:
    return parse_quantity(str(text))


def request_policies(device: Device) -> dict[str, Mapping[str, Any] | None]:
    """Each capacity's requestPolicy (None: none), as the slice publishes it."""
    return {k: (v or {}).get("requestPolicy") for k, v in
            (device.raw.get("capacity") or {}).items()}


def policy_amount(asked: Fraction | None, value: Fraction,
                  policy: Mapping[str, Any] | None) -> Fraction:
    """What asking `asked` (None: nothing) consumes: the policy's default, or the
    amount rounded up onto its range's step or to the next valid value."""
    if asked is None:
        if policy and policy.get("default") is not None:
            return _q(policy["default"])
        return value
    if not policy:
        return asked
    valid_range = policy.get("validRange")
    if valid_range and valid_range.get("min") is not None:
        low = _q(valid_range["min"])
        if asked < low:
            return low
        if valid_range.get("step") is None:
            return asked
        step = _q(valid_range["step"])
        steps = -((low - asked) // step)
        return low + step * steps
    if policy.get("validValues"):
        for option in (_q(v) for v in policy["validValues"]):
            if asked <= option:
                return option
    return asked


def violates_policy(amount: Fraction, policy: Mapping[str, Any] | None) -> bool:
    """An amount (already rounded) the policy does not allow: the device is left out."""
    if not policy:
        return False
    if policy.get("default") is not None and amount == _q(policy["default"]):
        return False
    valid_range = policy.get("validRange")
    if valid_range:
        if valid_range.get("max") is not None and amount > _q(valid_range["max"]):
            return True
        if valid_range.get("step") is not None:
            low = _q(valid_range.get("min") or 0)
            return (amount - low) % _q(valid_range["step"]) != 0
        return False
    if policy.get("validValues"):
        return all(amount != _q(v) for v in policy["validValues"])
    return False


# --- constraints --------------------------------------------------------------------------

def _constraint(kind: str, attribute: str, devices: list[Device]) -> ConstraintPlan:
    ids: dict[tuple[str, Any], int] = {}
    values: list[int] = []
    groups: list[int] = []
    for i, device in enumerate(devices):
        value = device.attribute(attribute)
        if not value:
            values.append(-1)
            continue
        key = next((k, v) for k, v in value.items() if k in ("int", "bool", "string", "version"))
        vid = ids.get(key)
        if vid is None:
            vid = ids[key] = len(groups)
            groups.append(0)
        groups[vid] |= 1 << i
        values.append(vid)
    return ConstraintPlan(MATCH if kind == "match" else DISTINCT, attribute, values, groups)


# --- counters and shared capacity as exact integers ---------------------------------------

@dataclass
class _Counters:
    """Every counter of the usable pools, each in units of the least common
    denominator of all amounts it is declared or consumed in."""

    names: list[str]
    index: dict[tuple[str, str, str], int]  # (pool, set, counter) -> position
    declared: list[int]
    uses: dict[DeviceRef, list[tuple[int, int]]]  # every device of the pools, any node
    pool_of: dict[DeviceRef, str]
    pool_counters: dict[str, list[int]]

    def available(self, ledger: Ledger) -> tuple[list[int], set[str]]:
        """Declared minus what allocated devices consume; pools with a counter below 0."""
        avail = list(self.declared)
        for ref in (*ledger.exclusive, *ledger.shares):
            for k, amount in self.uses.get(ref, ()):
                avail[k] -= amount
        negative = {pool for pool, ks in self.pool_counters.items()
                    if any(avail[k] < 0 for k in ks)}
        return avail, negative


def _counters(pools: list[Pool]) -> _Counters:
    index: dict[tuple[str, str, str], int] = {}
    names: list[str] = []
    values: list[Fraction] = []
    pool_counters: dict[str, list[int]] = {}
    positions: dict[DeviceRef, tuple[int, ...]] = {}  # of each counter the device uses
    devices: list[Device] = []
    pool_of: dict[DeviceRef, str] = {}
    for pool in pools:
        pool_name = str(pool)
        mine = pool_counters.setdefault(pool_name, [])
        local: dict[tuple[str, str], int] = {}  # (set, counter) -> position
        for set_name, counters in pool.counters.items():
            for counter, value in counters.items():
                index[(pool_name, set_name, counter)] = local[(set_name, counter)] = len(names)
                mine.append(len(names))
                names.append(f"{pool_name}/{set_name}/{counter}")
                values.append(value)
        for device in [*pool.devices, *pool.elsewhere]:
            positions[device.ref] = tuple(map(local.__getitem__, device.counter_keys))
            pool_of[device.ref] = pool_name
            devices.append(device)
    if all(v.denominator == 1 for v in values) and all(d.counts is not None for d in devices):
        # Whole amounts, as drivers publish them: nothing to scale.
        return _Counters(names, index, [v.numerator for v in values],
                         {d.ref: _shared_uses(positions[d.ref], d.counts or ())
                          for d in devices}, pool_of, pool_counters)
    scale = [v.denominator for v in values]
    for device in devices:
        for k, (_, _, amount) in zip(positions[device.ref], device.consumes, strict=True):
            scale[k] = lcm(scale[k], amount.denominator)
    return _Counters(names, index, [_scaled(v, scale[k]) for k, v in enumerate(values)],
                     {d.ref: [(k, _scaled(a, scale[k])) for k, (_, _, a) in zip(
                         positions[d.ref], d.consumes, strict=True)] for d in devices},
                     pool_of, pool_counters)


# A device's counter uses, one list per distinct value, shared by every model (read-only):
# the devices of a node model's nodes consume the same counters at the same positions,
# and a list and a tuple per use per device were over half of a dynamic-MIG node's model
# (120 of 207 kB).
_MAX_USES = 65536
_uses_of: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[int, int]]] = {}


def _shared_uses(positions: tuple[int, ...], counts: tuple[int, ...]) -> list[tuple[int, int]]:
    key = (positions, counts)
    found = _uses_of.get(key)
    if found is None:
        if len(_uses_of) >= _MAX_USES:
            _uses_of.clear()
        found = _uses_of[key] = list(zip(positions, counts, strict=True))
    return found


def _scaled(amount: Fraction, scale: int) -> int:
    """amount * scale, where scale is a multiple of amount's denominator (exact, and
    without Fraction arithmetic: a cold allocator scales every counter of a node)."""
    return amount.numerator * (scale // amount.denominator)


@dataclass
class _Dims:
    per_device: list[list[int]]
    names: list[tuple[int, str]]
    left: list[Fraction]


def _dims(devices: list[Device], multi: list[int], ledger: Ledger) -> _Dims:
    """One dimension per capacity of each device that allows multiple allocations."""
    per_device: list[list[int]] = [[] for _ in devices] if multi else []
    names: list[tuple[int, str]] = []
    left: list[Fraction] = []
    for i in multi:
        device = devices[i]
        used = ledger.capacity.get(device.ref, {})
        for name, value in sorted(device.capacity.items()):
            per_device[i].append(len(names))
            names.append((i, name))
            left.append(value - used.get(name, Fraction(0)))
    return _Dims(per_device, names, left)


def _scale_dims(problem: Problem, dims: _Dims) -> None:
    """Each dimension in units of the least common denominator of all its amounts."""
    wanted: list[tuple[Entry, int, list[tuple[int, Fraction]]]] = []
    for entry in problem.entries:
        for i, consumed in entry.consumed.items():
            if problem.multi[i]:
                names = {dims.names[k][1]: k for k in dims.per_device[i]}
                wanted.append((entry, i, [(names[n], a) for n, a in sorted(consumed.items())]))
    scale = [value.denominator for value in dims.left]
    for _, _, uses in wanted:
        for k, amount in uses:
            scale[k] = lcm(scale[k], amount.denominator)
    problem.dim_avail = [int(v * scale[k]) for k, v in enumerate(dims.left)]
    for entry, i, uses in wanted:
        entry.cons[i] = [(k, int(a * scale[k])) for k, a in uses]


# --- topology features --------------------------------------------------------------------

@dataclass
class _Topology:
    """Per-device numbers the topology score reads (allocator_ref.score)."""

    island: list[int]
    bandwidth: list[int]
    numa: list[int]
    pcie: list[int]
    slice_set: list[int]
    slice_mask: list[int]
    set_full: list[int]
    set_island: list[int]
    set_slots: list[list[tuple[int, int]]]  # (slot, counter index) per set
    island_members: list[list[int]]  # whole GPUs per island
    n_islands: int

    def free_sets(self, avail: list[int]) -> list[int]:
        return [sum(1 << slot for slot, k in slots if avail[k] >= 1) if slots else 0
                for slots in self.set_slots]

    def free_islands(self, base_inuse: int, set_free: list[int]) -> list[int]:
        free = [0] * self.n_islands
        for island, members in enumerate(self.island_members):
            for i in members:
                s = self.slice_set[i]
                if not base_inuse >> i & 1 and (s < 0 or set_free[s] == self.set_full[s]):
                    free[island] += 1
        return free


def _topology(devices: list[Device], counters: _Counters) -> _Topology:
    island_ids: dict[tuple[str, int], int] = {}
    pcie_ids: dict[str, int] = {}
    island, bandwidth, numa, pcie = [], [], [], []
    # MIG memory slices: counters named memory-slice-<i>, one set per physical GPU.
    set_ids: dict[tuple[str, str], int] = {}
    slice_set, slice_mask = [], []
    # The devices come pool by pool: the pool's names are made once per pool, not per device.
    driver = pool = where = island_name = bandwidth_name = ""
    for device in devices:
        if device.ref.pool != pool or device.ref.driver != driver:
            driver, pool = device.ref.driver, device.ref.pool
            where = f"{driver}/{pool}"
            island_name, bandwidth_name = f"{driver}/nvlinkIsland", f"{driver}/nvlinkBandwidthGBps"
        value = device.attribute(island_name)
        if value and "int" in value:
            island.append(island_ids.setdefault((where, int(value["int"])), len(island_ids)))
        else:
            island.append(-1)
        value = device.attribute(bandwidth_name)
        bandwidth.append(int(value["int"]) if value and "int" in value else 0)
        value = device.attribute("resource.kubernetes.io/numaNode")
        numa.append(int(value["int"]) if value and "int" in value else -1)
        value = device.attribute("resource.kubernetes.io/pcieRoot")
        pcie.append(pcie_ids.setdefault(value["string"], len(pcie_ids))
                    if value and "string" in value else -1)
        mask, owner = 0, -1
        for set_name, counter, _ in device.consumes:
            number = _slice_number(counter)
            if number >= 0:
                owner = set_ids.setdefault((where, set_name), len(set_ids))
                mask |= 1 << number
        slice_set.append(owner)
        slice_mask.append(mask)
    set_slots: list[list[tuple[int, int]]] = [[] for _ in set_ids]
    for (pool, set_name, counter), k in counters.index.items():
        s = set_ids.get((pool, set_name))
        if s is not None and _slice_number(counter) >= 0:
            set_slots[s].append((_slice_number(counter), k))
    set_full = [sum(1 << slot for slot, _ in slots) for slots in set_slots]
    set_island = [-1] * len(set_ids)
    members: list[list[int]] = [[] for _ in island_ids]
    for i in range(len(devices)):
        s = slice_set[i]
        whole = s < 0 or slice_mask[i] == set_full[s]
        if island[i] >= 0 and whole:
            members[island[i]].append(i)
            if s >= 0:
                set_island[s] = island[i]
    return _Topology(island, bandwidth, numa, pcie, slice_set, slice_mask, set_full,
                     set_island, set_slots, members, len(island_ids))


@cache
def _slice_number(counter: str) -> int:
    """N of a `memory-slice-N` counter below 32, else -1 (scores use 32-bit masks)."""
    if counter.startswith("memory-slice-") and counter[13:].isdigit() and int(counter[13:]) < 32:
        return int(counter[13:])
    return -1
