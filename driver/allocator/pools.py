"""ResourceSlices -> the resource pools one node can allocate from, in search order.

Follows the v1.37 scheduler's incubating allocator (GatherPools): only the newest
generation of a pool counts; a pool missing slices is incomplete; duplicate device
or counter-set names or a reference to an unknown counter make it invalid. Pools are
ordered by (driver, pool) with pools holding devices with binding conditions last,
slices by name, devices in slice order. A slice that carries shared counters holds
only counters: devices in it are not allocatable (the 1.35+ API forbids both).
A device's taints are its slice's, then those of the DeviceTaintRules that match it,
as the scheduler's ResourceSlice tracker patches them in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache, cached_property, lru_cache
from typing import Any

import orjson

from driver.allocator.cel import DeviceInput, Read, SelectorError, device_input, semver_value
from driver.allocator.input import InputError, Taint, TaintRule, Toleration
from driver.allocator.ledger import DeviceRef
from driver.allocator.versions import Recent, object_version
from driver.kube.quantity import QuantityError, parse_quantity
from driver.kube.semver import SemverError

# Selector results of one Allocator: (expression, the values it reads) -> result/error,
# or (expression, id(device)) for a device evaluated on its own.
Verdicts = dict[tuple[str, Any], "bool | str"]


@dataclass(frozen=True)
class Node:
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    # Written out (the dataclass keeps them) so that mypyc compiles them: a node is
    # made, hashed and compared on every decision.
    def __init__(self, name: str, labels: tuple[tuple[str, str], ...] = ()) -> None:
        object.__setattr__(self, "name", name)  # frozen
        object.__setattr__(self, "labels", labels)

    def label(self, key: str) -> str | None:
        return next((v for k, v in self.labels if k == key), None)

    def __hash__(self) -> int:
        return hash((self.name, self.labels))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self.name == other.name and self.labels == other.labels


@dataclass(slots=True)
class Device:
    """One device of a pool, with what CEL and the search need, converted once per
    slice version (it holds no selector result: those belong to one Allocator)."""

    ref: DeviceRef
    raw: Mapping[str, Any]
    slice: Mapping[str, Any]
    capacity: dict[str, Fraction]
    consumes: tuple[tuple[str, str, Fraction], ...]  # (counter set, counter, amount)
    # consumesCounters is set (even if it names no counter): the device takes part in the
    # counter check, and so in the pool-wide "no negative counter" rule.
    counted: bool
    multi: bool
    node_ok: bool
    taints: tuple[Taint, ...] = ()
    counts: tuple[int, ...] | None = None  # the consumes' amounts where all are whole
    counter_keys: tuple[tuple[str, str], ...] = ()  # the consumes' (set, counter)
    # No capacity with a requestPolicy or below zero: a request asking for none takes
    # every capacity whole.
    plain_capacity: bool = False
    _cel: DeviceInput | None = None

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and one is made per device of every slice version read.
    def __init__(self, ref: DeviceRef, raw: Mapping[str, Any], slice: Mapping[str, Any],
                 capacity: dict[str, Fraction], consumes: tuple[tuple[str, str, Fraction], ...],
                 counted: bool, multi: bool, node_ok: bool, taints: tuple[Taint, ...] = (),
                 counts: tuple[int, ...] | None = None,
                 counter_keys: tuple[tuple[str, str], ...] = (),
                 plain_capacity: bool = False, _cel: DeviceInput | None = None) -> None:
        self.ref, self.raw, self.slice, self.capacity = ref, raw, slice, capacity
        self.consumes, self.counted, self.multi, self.node_ok = consumes, counted, multi, node_ok
        self.taints, self.counts, self.counter_keys = taints, counts, counter_keys
        self.plain_capacity, self._cel = plain_capacity, _cel

    @property
    def cel(self) -> DeviceInput:
        if self._cel is None:
            self._cel = device_input(self.ref.driver, self.raw.get("attributes") or {},
                                     self.raw.get("capacity") or {}, self.multi)
        return self._cel

    def values(self, reads: tuple[Read, ...]) -> tuple[Any, ...] | None:
        """What `reads` are in this device's CEL input (`check_slices` passed), as
        hashable values; None where a field is given both qualified and short."""
        found: list[Any] = []
        for read in reads:
            if read[0] == "driver":
                found.append(self.ref.driver)
            elif read[0] == "allowMultipleAllocations":
                found.append(self.multi)
            else:
                key = _one_key(self.raw.get(read[0]) or {}, self.ref.driver, read[1], read[2])
                if key is None:
                    return None
                if not key:
                    found.append(_ABSENT)
                elif read[0] == "attributes":
                    found.append(_attribute_key(self.raw["attributes"][key]))
                else:
                    found.append(self.capacity[key])
        return tuple(found)

    def read_input(self, reads: tuple[Read, ...]) -> DeviceInput:
        """The CEL input with only the attributes and capacities `reads` names: a
        selector that reads nothing else (`values` is not None) sees the same in it, and
        it converts a few values instead of all."""
        names: dict[str, dict[str, Any]] = {"attributes": {}, "capacity": {}}
        for read in reads:
            given = self.raw.get(read[0]) or {}
            key = _one_key(given, self.ref.driver, read[1], read[2]) if len(read) == 3 else ""
            if key:
                names[read[0]][key] = given[key]
        return device_input(self.ref.driver, names["attributes"], names["capacity"], self.multi)

    def attribute(self, name: str) -> Mapping[str, Any] | None:
        """lookupAttribute: the qualified name, or the short name in the driver's domain."""
        attributes: Mapping[str, Mapping[str, Any]] = self.raw.get("attributes") or {}
        found = attributes.get(name)
        if found is not None:
            return found
        domain, ident = _domain_and_name(name)
        if domain == self.ref.driver:
            return attributes.get(ident)
        return None

    def untolerated(self, tolerations: Sequence[Toleration]) -> list[Taint]:
        """The taints that keep a request with these tolerations off the device."""
        return [taint for taint in self.taints
                if taint.blocks and not any(t.tolerates(taint) for t in tolerations)]


_ABSENT = ("absent",)


@cache
def _domain_and_name(qualified: str) -> tuple[str, str]:
    """`domain/name` split once per process: a node's model looks up the same few
    qualified names on every device."""
    domain, _, name = qualified.partition("/")
    return domain, name


def _one_key(fields: Mapping[str, Any], driver: str, domain: str, ident: str) -> str | None:
    """The name under which `fields` gives domain/ident ("" where it has none); None
    where it has both names (the later one wins in `device_input`)."""
    qualified = f"{domain}/{ident}"
    short = ident if domain == driver and ident in fields else ""
    if qualified in fields:
        return None if short else qualified
    return short


@cache
def _valid_semver(text: str) -> bool:
    try:
        semver_value(text)
    except (SemverError, SelectorError):
        return False
    return True


# Quantity texts parsed once per process, as the scheduler's informer parses each
# object's once: drivers publish the same few amounts on every device.
_parsed_quantity = lru_cache(maxsize=4096)(parse_quantity)


def _attribute_key(value: Mapping[str, Any]) -> tuple[str, Any]:
    """A checked attribute's CEL value as a hashable (kind, value)."""
    for kind in _ATTRIBUTE_TYPES:
        if kind in value:
            break
    return (kind, value[kind].split("+", 1)[0] if kind == "version" else value[kind])


@dataclass
class Pool:
    driver: str
    name: str
    incomplete: bool = False
    invalid: str = ""
    devices: list[Device] = field(default_factory=list)
    counters: dict[str, dict[str, Fraction]] = field(default_factory=dict)
    # Devices of the pool on other nodes: their allocations still consume counters.
    elsewhere: list[Device] = field(default_factory=list)
    # What the pool was built from (`_pool_key`); None: some slice has no version, so
    # neither the pool nor a node model holding it is kept across Allocators.
    key: tuple[Any, ...] | None = None

    @property
    def usable(self) -> bool:
        return not self.incomplete and not self.invalid

    @cached_property
    def by_ref(self) -> dict[DeviceRef, Device]:
        """Every device of the pool, this node's and elsewhere, by reference (read once
        the pool is gathered)."""
        return {d.ref: d for d in (*self.devices, *self.elsewhere)}

    def __str__(self) -> str:
        return f"{self.driver}/{self.name}"


_ATTRIBUTE_TYPES = {"int": int, "bool": bool, "string": str, "version": str}


def check_slices(slices: Sequence[Mapping[str, Any]]) -> None:
    """The shape the search relies on, as the API server validates it (attribute values
    of their kind, versions semantic, quantities that parse), for slices not read from
    the API server (no uid and resourceVersion: local files, tests); InputError names
    the slice and field.

    A slice read from the API server passed its validation (v1: exactly one attribute
    value, of its type; versions semantic; quantities typed; names and generations set),
    so it is not checked here: `_build_pool` checks, per pool as a node is tried, only
    what that validation lets through (list attributes, taken with the
    DRAListTypeAttributes gate), and names the field of a quantity it cannot parse.
    """
    for s in slices:
        if object_version(s) is None:
            _check_slice(s)


def _check_served(s: Mapping[str, Any]) -> None:
    """What the API server's validation accepts and the search cannot read: an attribute
    of a kind other than int, bool, string and version."""
    for device in s["spec"].get("devices") or ():
        attributes: dict[str, dict[str, Any]] = device.get("attributes") or {}
        for value in attributes.values():
            if len(value) != 1:
                _check_slice(s)
            for kind in value:
                if kind not in _ATTRIBUTE_TYPES:
                    _check_slice(s)


def _check_slice(s: Mapping[str, Any]) -> None:
    name = (s.get("metadata") or {}).get("name", "<unnamed>")
    where = f"ResourceSlice {name}"
    spec = s.get("spec")
    if not isinstance(spec, Mapping):
        raise InputError(f"{where}: spec: required")
    if not spec.get("driver"):
        raise InputError(f"{where}: spec.driver: required")
    pool = spec.get("pool") or {}
    if not pool.get("name"):
        raise InputError(f"{where}: spec.pool.name: required")
    for key in ("generation", "resourceSliceCount"):
        if not isinstance(pool.get(key, 0 if key == "generation" else None), int):
            raise InputError(f"{where}: spec.pool.{key}: must be an integer")
    for i, device in enumerate(spec.get("devices") or []):
        field_ = f"{where}: spec.devices[{i}]"
        if not device.get("name"):
            raise InputError(f"{field_}.name: required")
        for key, value in (device.get("attributes") or {}).items():
            kinds = [k for k in ("int", "bool", "string", "version") if k in (value or {})]
            if len(kinds) != 1:
                raise InputError(f"{field_}.attributes[{key}]: exactly one of int, bool, "
                                 "string, version (list attributes need the alpha "
                                 "DRAListTypeAttributes feature)")
            item = value[kinds[0]]
            if type(item) is not _ATTRIBUTE_TYPES[kinds[0]]:
                raise InputError(f"{field_}.attributes[{key}].{kinds[0]}: must be "
                                 f"{_ATTRIBUTE_TYPES[kinds[0]].__name__}, not "
                                 f"{type(item).__name__}")
            if kinds[0] == "version" and not _valid_semver(item):
                raise InputError(f"{field_}.attributes[{key}].version: {item!r} is not a "
                                 "semantic version (e.g. 1.2.3)")
        for key, value in (device.get("capacity") or {}).items():
            _quantity((value or {}).get("value"), f"{field_}.capacity[{key}].value")
        for j, use in enumerate(device.get("consumesCounters") or []):
            for counter, value in (use.get("counters") or {}).items():
                _quantity((value or {}).get("value"),
                          f"{field_}.consumesCounters[{j}].counters[{counter}].value")
    for i, counter_set in enumerate(spec.get("sharedCounters") or []):
        for counter, value in (counter_set.get("counters") or {}).items():
            _quantity((value or {}).get("value"),
                      f"{where}: spec.sharedCounters[{i}].counters[{counter}].value")


def _quantity(text: Any, where: str) -> Fraction:
    try:
        return parse_quantity(str(text))
    except QuantityError as err:
        raise InputError(f"{where}: {err}") from None


def node_matches(node: Node, node_name: str | None, all_nodes: bool,
                 selector: Mapping[str, Any] | None) -> bool:
    if node_name:
        return node.name == node_name
    if all_nodes:
        return True
    if selector is not None:
        return any(_term_matches(node, term) for term in selector.get("nodeSelectorTerms") or [])
    return False


def _term_matches(node: Node, term: Mapping[str, Any]) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False
    return all(_requirement(node.label(r["key"]), r) for r in expressions) and all(
        _requirement(node.name if r["key"] == "metadata.name" else None, r) for r in fields)


def _requirement(value: str | None, requirement: Mapping[str, Any]) -> bool:
    operator, values = requirement.get("operator"), requirement.get("values") or []
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and values:
        try:
            left, right = int(value), int(values[0])
        except ValueError:
            return False
        return left > right if operator == "Gt" else left < right
    return False


def slices_by_node(slices: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The slices by spec.nodeName, in their order; "" holds those without one."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for s in slices:
        found.setdefault(s["spec"].get("nodeName") or "", []).append(s)
    return found


def pools_complete(slices: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every pool among `slices` has as many slices of its newest generation
    among them as it says it has (resourceSliceCount); fewer: a paged list has more to
    bring, or the driver is still writing a new generation."""
    newest: dict[tuple[str, str], tuple[int, int, int]] = {}  # generation, count, seen
    for s in slices:
        pool = s["spec"]["pool"]
        key = (s["spec"]["driver"], pool["name"])
        generation = pool.get("generation", 0)
        known = newest.get(key)
        if known is None or generation > known[0]:
            newest[key] = (generation, pool["resourceSliceCount"], 1)
        elif generation == known[0]:
            newest[key] = (generation, known[1], known[2] + 1)
    return all(seen == count for _, count, seen in newest.values())


def gather_pools(slices: Sequence[Mapping[str, Any]], node: Node,
                 rules: Sequence[TaintRule] = (),
                 by_node: Mapping[str, list[Mapping[str, Any]]] | None = None) -> list[Pool]:
    """The pools `node` can allocate from, in the order the search visits them, their
    devices tainted by `rules` too. `by_node`: `slices_by_node(slices)`, when the
    caller gathers for many nodes. A pool whose slices all carry a version is built once
    per process for those versions (`_pool`), and so is the node's list of pools where
    it depends on the node's slices alone (`_gathered`)."""
    by_node = slices_by_node(slices) if by_node is None else by_node
    for_node = [*(by_node.get(node.name, ()) if node.name else ()), *by_node.get("", ())]
    versions = [object_version(s) for s in for_node]
    kept = None if None in versions else (node.name, node.labels, tuple(rules), *versions)
    known_pools = _gathered.get(kept) if kept is not None else None
    if known_pools is not None:
        return list(known_pools)
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in for_node:
        spec = s["spec"]
        if spec.get("nodeName") or spec.get("allNodes") or spec.get("nodeSelector") is not None:
            relevant = node_matches(node, spec.get("nodeName"), bool(spec.get("allNodes")),
                                    spec.get("nodeSelector"))
        elif spec.get("perDeviceNodeSelection"):
            relevant = any(node_matches(node, d.get("nodeName"), bool(d.get("allNodes")),
                                        d.get("nodeSelector")) for d in spec.get("devices") or [])
        else:
            continue
        if not relevant:
            continue
        key = (spec["driver"], spec["pool"]["name"])
        known = grouped.get(key)
        generation = spec["pool"].get("generation", 0)
        if known is None or generation > known[0]["spec"]["pool"].get("generation", 0):
            grouped[key] = [s]
        elif generation == known[0]["spec"]["pool"].get("generation", 0):
            known.append(s)
    plain: list[Pool] = []
    binding: list[Pool] = []
    for (driver, name), pool_slices in grouped.items():
        first = pool_slices[0]["spec"]["pool"]
        everything: list[Mapping[str, Any]] = []
        if len(pool_slices) != first["resourceSliceCount"]:
            kept = None  # other nodes' slices decide: not kept
            generation = first.get("generation", 0)
            same = [s for s in slices if s["spec"]["driver"] == driver
                    and s["spec"]["pool"]["name"] == name]
            if any(s["spec"]["pool"].get("generation", 0) > generation for s in same):
                continue  # obsolete: the driver is replacing this generation
            everything = [s for s in same if s["spec"]["pool"].get("generation", 0) == generation]
            if len(everything) != first["resourceSliceCount"]:
                plain.append(Pool(driver, name, incomplete=True,
                                  key=("incomplete", driver, name)))
                continue
        pool = _pool(driver, name, pool_slices, everything, node, tuple(rules))
        has_binding = any(d.raw.get("bindingConditions") is not None for d in pool.devices)
        (binding if has_binding else plain).append(pool)
    plain.sort(key=lambda p: (p.driver, p.name))
    binding.sort(key=lambda p: (p.driver, p.name))
    if kept is not None:
        _gathered.put(kept, (*plain, *binding))
    return plain + binding


def held_devices(pools: Pool | Sequence[Pool]) -> int:
    """Devices held, the measure of the caches' bound (a node's model takes about 3 kB
    per device: a dgx-h100 in dynamic MIG mode, 208 devices, about 0.6 MB)."""
    held = [pools] if isinstance(pools, Pool) else pools
    return 1 + sum(len(p.devices) + len(p.elsewhere) for p in held)


MAX_DEVICES = 65536  # kept in each cache across Allocators (`held_devices`)
# Pools built per (driver, pool, node, taint rules, the versions of its slices): what
# an informer decodes once per object version.
_pools: Recent[tuple[Any, ...], Pool] = Recent(MAX_DEVICES, held_devices)
# A node's pools per (node, taint rules, the versions of the slices that name it or no
# node), where no pool needed another node's slices.
_gathered: Recent[tuple[Any, ...], tuple[Pool, ...]] = Recent(MAX_DEVICES, held_devices)


def _pool_key(driver: str, name: str, pool_slices: list[Mapping[str, Any]],
              everything: list[Mapping[str, Any]], node: Node, rules: tuple[TaintRule, ...]
              ) -> tuple[Any, ...] | None:
    """What the pool is built from; None where a slice has no uid or resourceVersion
    (local files, tests): such a pool is built on every call."""
    versions = []
    for group in (pool_slices, everything):
        found = [object_version(s) for s in group]
        if None in found:
            return None
        versions.append(tuple(sorted(found)))  # type: ignore[type-var]
    return (driver, name, node.name, node.labels, rules, *versions)


def _pool(driver: str, name: str, pool_slices: list[Mapping[str, Any]],
          everything: list[Mapping[str, Any]], node: Node, rules: tuple[TaintRule, ...]
          ) -> Pool:
    key = _pool_key(driver, name, pool_slices, everything, node, rules)
    found = _pools.get(key) if key is not None else None
    if found is None:
        found = _build_pool(driver, name, pool_slices, everything, node, rules)
        if key is not None:
            found.key = key
            _pools.put(key, found)
    return found


def _build_pool(driver: str, name: str, pool_slices: list[Mapping[str, Any]],
                everything: list[Mapping[str, Any]], node: Node,
                rules: Sequence[TaintRule]) -> Pool:
    """The pool, its slices read from the API server checked for what the server's
    validation lets through (`check_slices` checked the others whole)."""
    served = [s for s in (*pool_slices, *everything) if object_version(s) is not None]
    for s in served:
        _check_served(s)
    try:
        return _read_pool(driver, name, pool_slices, everything, node, rules)
    except QuantityError:
        for s in served:
            _check_slice(s)  # raises, naming the field
        raise


def _read_pool(driver: str, name: str, pool_slices: list[Mapping[str, Any]],
               everything: list[Mapping[str, Any]], node: Node,
               rules: Sequence[TaintRule]) -> Pool:
    pool = Pool(driver, name)
    ordered = sorted(pool_slices, key=lambda s: s["metadata"]["name"])
    taken = {s["metadata"]["name"] for s in ordered}
    others = [s for s in everything if s["metadata"]["name"] not in taken]
    device_slices = [s for s in ordered if not s["spec"].get("sharedCounters")]
    counter_slices = [s for s in [*ordered, *others] if s["spec"].get("sharedCounters")]
    other_device_slices = [s for s in others if not s["spec"].get("sharedCounters")]
    seen: set[str] = set()
    for s in device_slices:
        for raw in s["spec"].get("devices") or []:
            if raw["name"] in seen:
                pool.invalid = f"duplicate device name {raw['name']}"
                return pool
            seen.add(raw["name"])
    for s in counter_slices:
        for counter_set in s["spec"]["sharedCounters"]:
            if counter_set["name"] in pool.counters:
                pool.invalid = f"duplicate counter set name {counter_set['name']}"
                return pool
            pool.counters[counter_set["name"]] = {
                counter: _parsed_quantity(str(value["value"]))
                for counter, value in (counter_set.get("counters") or {}).items()}
    for s in [*device_slices, *other_device_slices]:
        for raw in s["spec"].get("devices") or []:
            for use in raw.get("consumesCounters") or []:
                known = pool.counters.get(use["counterSet"])
                if known is None:
                    pool.invalid = f"counter set {use['counterSet']} not found"
                    return pool
                for counter in use.get("counters") or {}:
                    if counter not in known:
                        pool.invalid = f"counter {counter} not found in counter set " \
                                       f"{use['counterSet']}"
                        return pool
    pool.devices = [_device(driver, name, s, raw, parsed, node, rules)
                    for s in device_slices for raw, parsed in _with_amounts(s)]
    pool.elsewhere = [_device(driver, name, s, raw, parsed, node, rules)
                      for s in other_device_slices for raw, parsed in _with_amounts(s)]
    return pool


@dataclass(frozen=True, slots=True)
class _Amounts:
    """A device's amounts, parsed (the fields of `Device` of the same names)."""

    consumes: tuple[tuple[str, str, Fraction], ...]
    counts: tuple[int, ...] | None
    counter_keys: tuple[tuple[str, str], ...]
    capacity: dict[str, Fraction]
    plain_capacity: bool
_MAX_AMOUNTS = 16384  # slice versions whose amounts are kept
_amounts_of: dict[tuple[str, str], list[_Amounts]] = {}


def _with_amounts(s: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], _Amounts]]:
    return zip(s["spec"].get("devices") or [], _amounts(s), strict=True)


def _amounts(s: Mapping[str, Any]) -> list[_Amounts]:
    """The amounts of the slice's devices (read-only), parsed once per slice version
    (uid and resourceVersion), as the scheduler's informer decodes each version once."""
    version = object_version(s)
    found = _amounts_of.get(version) if version is not None else None
    if found is None:
        devices = s["spec"].get("devices") or []
        if version is None:
            found = [_device_amounts(raw) for raw in devices]
        else:
            found = [_served_amounts(raw) for raw in devices]
            if len(_amounts_of) >= _MAX_AMOUNTS:
                _amounts_of.clear()
            _amounts_of[version] = found
    return found


# Amounts by the JSON of what they are parsed from: every node of a model publishes the
# same consumptions and capacities (counter set names included), so at 1,000 nodes all
# but the first node's are a lookup (about 3x cheaper than parsing, measured on dgx-h100
# dynamic MIG devices).
_MAX_SHARED = 65536
_shared_amounts: dict[bytes, _Amounts] = {}


def _served_amounts(raw: Mapping[str, Any]) -> _Amounts:
    """`_device_amounts` of a device read from the API server (JSON, so it encodes)."""
    key = orjson.dumps((raw.get("consumesCounters"), raw.get("capacity")))
    found = _shared_amounts.get(key)
    if found is None:
        if len(_shared_amounts) >= _MAX_SHARED:
            _shared_amounts.clear()
        found = _shared_amounts[key] = _device_amounts(raw)
    return found


def _device_amounts(raw: Mapping[str, Any]) -> _Amounts:
    consumes = tuple((use["counterSet"], counter, _parsed_quantity(str(value["value"])))
                     for use in raw.get("consumesCounters") or []
                     for counter, value in (use.get("counters") or {}).items())
    whole = all(amount.denominator == 1 for _, _, amount in consumes)
    given = raw.get("capacity") or {}
    capacity = {key: _parsed_quantity(str(value["value"])) for key, value in given.items()}
    return _Amounts(consumes,
                    tuple(amount.numerator for _, _, amount in consumes) if whole else None,
                    tuple((set_name, counter) for set_name, counter, _ in consumes), capacity,
                    not any((value or {}).get("requestPolicy") for value in given.values())
                    and all(amount >= 0 for amount in capacity.values()))


def _device(driver: str, pool: str, s: Mapping[str, Any], raw: Mapping[str, Any],
            amounts: _Amounts, node: Node, rules: Sequence[TaintRule]) -> Device:
    node_ok = True
    if s["spec"].get("perDeviceNodeSelection"):
        node_ok = node_matches(node, raw.get("nodeName"), bool(raw.get("allNodes")),
                               raw.get("nodeSelector"))
    own = raw.get("taints")
    taints = (*(Taint.of(t) for t in own or ()),
              *(r.taint for r in rules if r.applies(driver, pool, raw["name"]))
              ) if own or rules else ()
    return Device(DeviceRef(driver, pool, raw["name"]), raw, s, amounts.capacity,
                  amounts.consumes, bool(raw.get("consumesCounters")),
                  bool(raw.get("allowMultipleAllocations")), node_ok, taints, amounts.counts,
                  amounts.counter_keys, amounts.plain_capacity)
